// The live view of one job. It follows the job from the page, through the REST API and
// Server-Sent Events, so it keeps updating while the kernel runs other cells. A view that gets
// none of the page's follow streams (FOLLOW_STREAMS_MAX in common.js) polls the output instead.
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
    this.lastLineChars = 0;
    this.dropped = 0;
    this.carriageReturn = false;
  }

  write(text, stream) {
    const visibleText = this.skipHiddenLines(text);
    for (const part of visibleText.split(/(\r\n|\r|\n)/)) {
      if (part === "\n" || part === "\r\n") {
        this.lines.push([]);
        this.lastLineChars = 0;
        this.carriageReturn = false;
      } else if (part === "\r") {
        this.carriageReturn = true;
      } else if (part) {
        if (this.carriageReturn) {
          this.lines[this.lines.length - 1] = [];
          this.lastLineChars = 0;
          this.carriageReturn = false;
        }
        // render() shows at most LINE_CHARS_SHOWN characters of a line, so no more of a long
        // line is kept in memory.
        if (this.lastLineChars < LINE_CHARS_SHOWN) {
          const visiblePart = part.slice(0, LINE_CHARS_SHOWN - this.lastLineChars);
          this.lines[this.lines.length - 1].push([visiblePart, stream]);
          this.lastLineChars += visiblePart.length;
        }
      }
    }
    // One splice, not a shift per line: shifting a long array line by line takes quadratic time.
    const excess = this.lines.length - (this.maxLines + 1);
    if (excess > 0) {
      this.lines.splice(0, excess);
      this.dropped += excess;
    }
  }

  // Return the end of `text` that can still be shown, and count the lines before it as
  // dropped. One "output" event carries up to 1 MiB (FOLLOW_CHUNK in sandbox/manager.py), which
  // can be half a million lines, and splitting all of them would block the page.
  skipHiddenLines(text) {
    let cut = text.length;
    for (let found = 0; found <= this.maxLines; found += 1) {
      cut = cut > 0 ? text.lastIndexOf("\n", cut - 1) : -1;
      if (cut < 0) return text;
    }
    // Every line that ends at or before `cut` scrolls out of the tail: the complete lines kept
    // so far, the open line (which the first newline ends) and the lines of `text` up to `cut`.
    let ended = 0;
    for (let at = text.indexOf("\n"); at !== -1 && at <= cut; at = text.indexOf("\n", at + 1)) {
      ended += 1;
    }
    this.dropped += this.lines.length - 1 + ended;
    this.lines = [[]];
    this.lastLineChars = 0;
    this.carriageReturn = false;
    return text.slice(cut + 1);
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
  // A single sample is drawn as a flat line: a polyline of one point draws nothing.
  const drawn = samples.length === 1 ? [samples[0], samples[0]] : samples;
  const points = drawn
    .map((sample, index) => {
      const x = (index / (drawn.length - 1)) * width;
      // Zero is drawn 2 px above the bottom edge, where the stroke is not cut in half.
      const y = height - 2 - Math.min(1, (sample[key] || 0) / (top || 1)) * (height - 4);
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
  let streaming = false;
  let outputComplete = false;
  let missing = false;
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
  link.href = `${apiUrl()}jobs/${jobId}/output?format=text`;
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
      updateJob(await stopJob(jobId));
      scheduleRender();
    } catch (failure) {
      error.textContent = `Stop failed: ${failure.message}`;
      stopButton.disabled = false;
      stopButton.textContent = "Stop";
    }
  });

  // Requests overlap: a poll sent before the job ended can return after the Stop request or
  // the "end" event did, and must not show the job running again.
  function updateJob(next) {
    if (!(job && ENDED.has(job.status) && !ENDED.has(next.status))) job = next;
  }

  function renderHeader() {
    let status = job ? job.status : "PENDING";
    if (!job && missing) status = "NOT FOUND";
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
    stopButton.hidden = ENDED.has(status) || missing;
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

  function handleEvent(name, data) {
    if (name === "output") {
      tail.write(data.text, data.stream);
      offset = data.offset;
    } else if (name === "end" || name === "status") {
      updateJob(data);
    }
    scheduleRender();
  }

  // Start following the output live if one of the page's follow streams is free, and return
  // whether one was.
  function startFollowing() {
    if (!acquireFollowStream()) return false;
    streaming = true;
    follow();
    return true;
  }

  function stopFollowing() {
    if (source) source.close();
    if (streaming) releaseFollowStream();
    streaming = false;
  }

  function follow() {
    if (closed) return;
    source = new EventSource(`${apiUrl()}jobs/${jobId}/output?format=sse&follow=1&offset=${offset}`);
    source.addEventListener("output", (event) => handleEvent("output", JSON.parse(event.data)));
    // A follow stream ends exactly when the job has ended and all of its output is sent.
    source.addEventListener("end", (event) => {
      handleEvent("end", JSON.parse(event.data));
      outputComplete = true;
      stopFollowing();
    });
    source.onerror = () => {
      // The browser would reconnect from offset 0; reconnect from where the view is instead.
      source.close();
      if (!closed && !outputComplete && !missing) setTimeout(follow, RECONNECT_DELAY_MS);
      else stopFollowing();
    };
  }

  // Read the output written since `offset`, for a view that has no follow stream.
  async function readOutput() {
    const events = await fetchEvents(`jobs/${jobId}/output?format=sse&offset=${offset}`);
    for (const [name, data] of events) handleEvent(name, data);
  }

  async function poll() {
    if (closed) return;
    try {
      updateJob(await callApi(`jobs/${jobId}`));
      if (!streaming && !outputComplete && !startFollowing()) {
        // A read that starts after the job has ended gets the rest of its output.
        const endedBeforeRead = ENDED.has(job.status);
        await readOutput();
        outputComplete = endedBeforeRead;
      }
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
      // A deleted job, or one of another user, stays missing: stop asking for it.
      if (failure.status === 404) {
        missing = true;
        stopFollowing();
      }
    }
    scheduleRender();
    const finished = job && ENDED.has(job.status) && (outputComplete || streaming);
    if (!finished && !missing) setTimeout(poll, model.get("stats_interval"));
  }

  startFollowing();
  poll();
  const clock = setInterval(renderHeader, 1000);
  return () => {
    closed = true;
    clearInterval(clock);
    stopFollowing();
  };
}

export default { render };
