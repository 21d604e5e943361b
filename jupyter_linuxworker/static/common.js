// Shared by the job views: where the API is, and how to call it from the page.
export const STATUS_COLORS = {
  PENDING: "#80868b",
  RUNNING: "#1a73e8",
  COMPLETED: "#188038",
  FAILED: "#d93025",
  STOPPED: "#e37400",
  LOST: "#7b1fa2",
};
export const ENDED = new Set(["COMPLETED", "FAILED", "STOPPED", "LOST"]);

export function apiUrl() {
  let base = "/";
  const config = document.getElementById("jupyter-config-data");
  if (config) {
    try {
      base = JSON.parse(config.textContent).baseUrl || "/";
    } catch (error) {
      base = "/";
    }
  }
  return (base.endsWith("/") ? base : base + "/") + "linuxworker/api/";
}

function xsrfToken() {
  const match = document.cookie.match(/\b_xsrf=([^;]*)/);
  return match ? decodeURIComponent(match[1]) : "";
}

// Browsers open at most 6 HTTP/1.1 connections to one host (Chromium and Firefox), and an
// EventSource keeps one open while its job runs. So at most FOLLOW_STREAMS_MAX views of a page
// follow their output live, and the other views poll it, which leaves connections free for
// JupyterLab itself, the polls and the Stop buttons.
// NOTE: the limit counts the streams of one page, so each further JupyterLab tab of the same
// server can open as many more.
const FOLLOW_STREAMS_MAX = 2;

function followStreams() {
  // Kept on window, because each widget may run its own copy of this module.
  if (!window.linuxworkerFollowStreams) window.linuxworkerFollowStreams = { open: 0 };
  return window.linuxworkerFollowStreams;
}

export function acquireFollowStream() {
  const streams = followStreams();
  if (streams.open >= FOLLOW_STREAMS_MAX) return false;
  streams.open += 1;
  return true;
}

export function releaseFollowStream() {
  const streams = followStreams();
  streams.open = Math.max(0, streams.open - 1);
}

// Send a request to the API and return the response. Unless it is a success, throw an Error
// with the server's message and the HTTP `status`.
async function send(path, options = {}) {
  const headers = { "X-XSRFToken": xsrfToken(), ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(apiUrl() + path, {
    credentials: "same-origin",
    ...options,
    headers,
  });
  if (response.ok) return response;
  let message = response.statusText;
  try {
    message = (await response.json()).message || message;
  } catch (parseError) {
    // The body is not JSON: keep the status text.
  }
  const failure = new Error(message);
  failure.status = response.status;
  throw failure;
}

export async function callApi(path, options = {}) {
  const text = await (await send(path, options)).text();
  return text ? JSON.parse(text) : null;
}

// Fetch a finite stream of Server-Sent Events and return its events as [name, data] pairs, with
// the data parsed from JSON.
export async function fetchEvents(path) {
  const text = await (await send(path)).text();
  const events = [];
  for (const block of text.split("\n\n")) {
    const name = /^event: (.*)$/m.exec(block);
    const data = /^data: (.*)$/m.exec(block);
    if (name && data) events.push([name[1], JSON.parse(data[1])]);
  }
  return events;
}

export function stopJob(jobId) {
  return callApi(`jobs/${jobId}/stop`, { method: "POST", body: "{}" });
}

export function badge(status) {
  const span = document.createElement("span");
  span.className = "lw-badge";
  span.textContent = status;
  span.style.background = STATUS_COLORS[status] || "#80868b";
  return span;
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

export function formatSeconds(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}
