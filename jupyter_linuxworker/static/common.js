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

export async function callApi(path, options = {}) {
  const headers = { "X-XSRFToken": xsrfToken(), ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(apiUrl() + path, {
    credentials: "same-origin",
    ...options,
    headers,
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((data && data.message) || response.statusText);
  return data;
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
