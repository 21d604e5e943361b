// The user's jobs, newest first, refreshed from the REST API with a Stop button each.
// common.js is prepended to this file when the widget is created.

function render({ model, el }) {
  let closed = false;
  el.classList.add("lw-list");
  const table = document.createElement("table");
  const error = document.createElement("div");
  error.className = "lw-error";
  el.append(table, error);

  async function refresh() {
    if (closed) return;
    try {
      const status = model.get("status");
      const query = `jobs?limit=${model.get("limit")}` + (status ? `&status=${status.toUpperCase()}` : "");
      const page = await callApi(query);
      const head = document.createElement("tr");
      for (const title of ["Id", "Name", "Status", "Exit", "Created", "Ended", ""]) {
        const cell = document.createElement("th");
        cell.textContent = title;
        head.appendChild(cell);
      }
      const rows = page.jobs.map((job) => {
        const row = document.createElement("tr");
        row.dataset.jobId = job.id;
        const values = [
          job.id.slice(0, 12),
          job.name,
          null,
          job.exit_code === null ? "" : String(job.exit_code),
          job.created_at || "",
          job.ended_at || "",
        ];
        for (const value of values) {
          const cell = document.createElement("td");
          if (value === null) cell.appendChild(badge(job.status));
          else cell.textContent = value;
          row.appendChild(cell);
        }
        const action = document.createElement("td");
        if (!ENDED.has(job.status)) {
          const button = document.createElement("button");
          button.className = "lw-stop";
          button.textContent = "Stop";
          button.addEventListener("click", async () => {
            button.disabled = true;
            try {
              await stopJob(job.id);
            } catch (failure) {
              error.textContent = `Stop failed: ${failure.message}`;
            }
            refresh();
          });
          action.appendChild(button);
        }
        row.appendChild(action);
        return row;
      });
      table.replaceChildren(head, ...rows);
      error.textContent = "";
    } catch (failure) {
      error.textContent = failure.message;
    }
  }

  refresh();
  const timer = setInterval(refresh, model.get("interval"));
  return () => {
    closed = true;
    clearInterval(timer);
  };
}

export default { render };
