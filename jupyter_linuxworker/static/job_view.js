// The live view of one job. It follows the job from the page, through the REST API and
// Server-Sent Events, so it keeps updating while the kernel runs other cells.
// common.js is prepended to this file when the widget is created.

const SAMPLES_KEPT = 120;
const LINE_CHARS_SHOWN = 4000;
const RENDER_DELAY_MS = 100;
const RECONNECT_DELAY_MS = 1000;

class Tail {
  // The last lines of the output as a terminal shows them: "\r" starts the line again.
  constructor(maxLines) {
    this.maxLines = maxLines;
    this.lines = [[]];
    this.dropped = 0;
    this.carriageReturn = false;
  }

  write(text, stream) {
    for (const part of text.split(/(\r\n|\r|\n)/)) {
      if (part === "\n" || part === "\r\n") {
        this.lines.push([]);
        this.carriageReturn = false;
      } else if (part === "\r") {
        this.carriageReturn = true;
      } else if (part) {
        if (this.carriageReturn) {
          this.lines[this.lines.length - 1] = [];
          this.carriageReturn = false;
        }
        this.lines[this.lines.length - 1].push([part, stream]);
      }
    }
    while (this.lines.length > this.maxLines + 1) {
      this.lines.shift();
      this.dropped += 1;
    }
  }

  render(pre) {
    const fragment = document.createDocumentFragment();
    this.lines.forEach((segments, index) => {
      let shown = 0;
      for (const [text, stream] of segments) {
        if (shown >= LINE_CHARS_SHOWN) break;
        const span = document.createElement("span");
        span.textContent = text.slice(0, LINE_CHARS_SHOWN - shown);
        shown += span.textContent.length;
        if (stream !== "stdout") span.className = `lw-${stream}`;
        fragment.appendChild(span);
      }
      if (index < this.lines.length - 1) fragment.appendChild(document.createTextNode("\n"));
    });
    pre.replaceChildren(fragment);
  }
}

function sparkline(samples, key, top, color) {
  const width = 240;
  const height = 36;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("class", "lw-graph");
  const points = samples
    .map((sample, index) => {
      const x = samples.length > 1 ? (index / (samples.length - 1)) * width : 0;
      const y = height - Math.min(1, (sample[key] || 0) / (top || 1)) * (height - 2) - 1;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    })
    .join(" ");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", color);
  line.setAttribute("stroke-width", "1.5");
  svg.appendChild(line);
  return svg;
}

function render({ model, el }) {
  const jobId = model.get("job_id");
  const tail = new Tail(model.get("tail_lines"));
  const samples = [];
  let job = null;
  let stats = null;
  let limits = {};
  let offset = 0;
  let source = null;
  let renderTimer = null;
  let closed = false;

  el.classList.add("lw-job");
  const header = document.createElement("div");
  header.className = "lw-header";
  const usage = document.createElement("div");
  usage.className = "lw-usage";
  const pre = document.createElement("pre");
  pre.className = "lw-output";
  const notice = document.createElement("div");
  notice.className = "lw-notice";
  const footer = document.createElement("div");
  footer.className = "lw-footer";
  const stopButton = document.createElement("button");
  stopButton.className = "lw-stop";
  stopButton.textContent = "Stop";
  const link = document.createElement("a");
  link.href = `${apiUrl()}jobs/${jobId}/output`;
  link.target = "_blank";
  link.textContent = "Whole output";
  const error = document.createElement("span");
  error.className = "lw-error";
  footer.append(stopButton, link, error);
  el.append(header, usage, pre, notice, footer);

  stopButton.addEventListener("click", async () => {
    stopButton.disabled = true;
    stopButton.textContent = "Stopping...";
    try {
      job = await stopJob(jobId);
      scheduleRender();
    } catch (failure) {
      error.textContent = `Stop failed: ${failure.message}`;
      stopButton.disabled = false;
      stopButton.textContent = "Stop";
    }
  });

  function renderHeader() {
    const status = job ? job.status : "PENDING";
    const name = document.createElement("strong");
    name.textContent = model.get("name") || (job && job.name) || "job";
    const id = document.createElement("code");
    id.textContent = jobId.slice(0, 12);
    const facts = document.createElement("span");
    facts.className = "lw-facts";
    const parts = [];
    if (job && job.started_at) {
      const start = Date.parse(job.started_at);
      const end = job.ended_at ? Date.parse(job.ended_at) : Date.now();
      parts.push(formatSeconds(Math.max(0, end - start) / 1000));
    }
    if (job && job.exit_code !== null && job.exit_code !== undefined) {
      parts.push(`exit code ${job.exit_code}`);
    }
    if (job && job.detail) parts.push(job.detail);
    facts.textContent = parts.join(" · ");
    header.replaceChildren(name, id, badge(status), facts);
    stopButton.hidden = ENDED.has(status);
  }

  function renderUsage() {
    if (!samples.length) {
      usage.replaceChildren();
      return;
    }
    const last = samples[samples.length - 1];
    const cpuTop = limits.cpus || Math.max(1, ...samples.map((s) => s.cpu || 0));
    const memoryTop = limits.memory || Math.max(...samples.map((s) => s.memory || 0), 1);
    const cpuLabel = document.createElement("span");
    cpuLabel.textContent = `CPU ${(last.cpu || 0).toFixed(2)}` + (limits.cpus ? ` of ${limits.cpus}` : "");
    const memoryLabel = document.createElement("span");
    memoryLabel.textContent =
      `Memory ${formatBytes(last.memory)}` + (limits.memory ? ` of ${formatBytes(limits.memory)}` : "");
    usage.replaceChildren(
      cpuLabel,
      sparkline(samples, "cpu", cpuTop, "#1a73e8"),
      memoryLabel,
      sparkline(samples, "memory", memoryTop, "#188038"),
    );
  }

  function renderAll() {
    renderTimer = null;
    renderHeader();
    renderUsage();
    tail.render(pre);
    notice.textContent = tail.dropped
      ? `Showing the last ${tail.maxLines} lines: ${tail.dropped} earlier lines are in the whole output.`
      : "";
    pre.scrollTop = pre.scrollHeight;
  }

  // Many events a second become one redraw every RENDER_DELAY_MS.
  function scheduleRender() {
    if (renderTimer === null && !closed) renderTimer = setTimeout(renderAll, RENDER_DELAY_MS);
  }

  function follow() {
    source = new EventSource(`${apiUrl()}jobs/${jobId}/output?format=sse&follow=1&offset=${offset}`);
    source.addEventListener("output", (event) => {
      const piece = JSON.parse(event.data);
      tail.write(piece.text, piece.stream);
      offset = piece.offset;
      scheduleRender();
    });
    source.addEventListener("end", (event) => {
      job = JSON.parse(event.data);
      source.close();
      scheduleRender();
    });
    source.onerror = () => {
      // The browser would reconnect from offset 0; reconnect from where the view is instead.
      source.close();
      if (!closed && !(job && ENDED.has(job.status))) setTimeout(follow, RECONNECT_DELAY_MS);
    };
  }

  async function poll() {
    if (closed) return;
    try {
      job = await callApi(`jobs/${jobId}`);
      stats = await callApi(`jobs/${jobId}/stats`);
      limits = stats.limits || {};
      const now = Date.now() / 1000;
      const previous = samples[samples.length - 1];
      const cpu =
        previous && stats.cpu_seconds !== null
          ? Math.max(0, (stats.cpu_seconds - previous.cpuSeconds) / (now - previous.time))
          : 0;
      samples.push({ time: now, cpuSeconds: stats.cpu_seconds || 0, cpu, memory: stats.memory_bytes });
      if (samples.length > SAMPLES_KEPT) samples.shift();
      error.textContent = "";
    } catch (failure) {
      error.textContent = failure.message;
    }
    scheduleRender();
    if (!(job && ENDED.has(job.status))) setTimeout(poll, model.get("stats_interval"));
  }

  follow();
  poll();
  const clock = setInterval(renderHeader, 1000);
  return () => {
    closed = true;
    clearInterval(clock);
    if (source) source.close();
  };
}

export default { render };
