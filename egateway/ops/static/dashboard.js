// The egateway admin dashboard: one overview on load, then live updates from
// the gateway's event stream (Server-Sent Events).  Credentials travel in the
// HttpOnly cookie the first load set; actions add the X-Egateway-Dashboard
// header, which the gateway requires of any action authenticated by it.
"use strict";

(function () {
  const base = location.pathname.replace(/admin\/?$/, "");
  const kernels = new Map();
  let skew = 0; // server clock minus ours, in ms

  if (new URLSearchParams(location.search).has("token")) {
    // The cookie holds it now; keep it out of the history and bookmarks.
    history.replaceState(null, "", location.pathname);
  }

  const $ = (selector) => document.querySelector(selector);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function say(text, kind) {
    const message = $("#message");
    message.textContent = text || "";
    message.className = text ? kind || "info" : "";
  }

  function duration(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  const since = (when) => (when ? duration(Date.now() + skew - Date.parse(when)) : "");

  function placement(model) {
    // host, pid, and what the launcher adds (a Slurm job id, a pod).
    return Object.entries(model.placement || {})
      .filter(([key, value]) => key !== "ip" && value !== null && value !== "")
      .map(([key, value]) => key + " " + value)
      .join(", ");
  }

  function phases(model) {
    if (model.state !== "launching" && model.state !== "restarting") return model.reason || "";
    const list = model.phases || [];
    return list.map((p) => p.phase + (p.detail ? " (" + p.detail + ")" : "")).join(" → ");
  }

  async function call(method, path, body) {
    const response = await fetch(base + path, {
      method,
      credentials: "same-origin",
      headers: { "X-Egateway-Dashboard": "1", "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok) {
      let text = response.status + " " + response.statusText;
      try {
        const error = await response.json();
        text = error.message || text;
      } catch (e) {
        // Not JSON: the status says it.
      }
      throw new Error(text);
    }
    return response.status === 204 ? null : response.json();
  }

  function act(label, path) {
    return async (event) => {
      const button = event.currentTarget;
      button.disabled = true;
      try {
        await call("POST", path);
        say(label + ": done");
      } catch (e) {
        say(label + ": " + e.message, "error");
      } finally {
        button.disabled = false;
      }
    };
  }

  // Each kernel keeps its row (and its buttons) while it is listed: rows are
  // updated in place, never rebuilt.  A row rebuilt by an event that arrives
  // between the mouse's press and release (any kernel's change re-renders the
  // table) would take the button away under the pointer, and the browser
  // sends no click at all.
  const rows = new Map();

  function kernelCells(model) {
    return [
      el("td", { title: model.id }, el("code", {}, model.id.slice(0, 8))),
      el("td", {}, model.owner || model.username || ""),
      el("td", {}, model.name),
      el("td", {}, model.launcher || ""),
      el("td", {}, el("span", { class: "badge state-" + model.state }, model.state)),
      el("td", {}, placement(model)),
      el("td", { "data-since": model.started || "" }, since(model.started)),
      el("td", { "data-since": model.last_activity || "" }, since(model.last_activity)),
      el("td", {}, model.connections ?? ""),
      el("td", {}, model.restarts ?? 0),
      el("td", { class: "reason" }, phases(model)),
    ];
  }

  function kernelRow(model) {
    // Its cells are filled by refreshRow.
    const short = model.id.slice(0, 8);
    const path = "api/admin/kernels/" + model.id + "/";
    const row = el("tr", { "data-kernel": model.id });
    row.append(
      ...kernelCells(model).map(() => el("td")),
      el(
        "td",
        {},
        el(
          "div",
          { class: "actions" },
          el("button", { type: "button", "data-action": "interrupt", onclick: act("Interrupt " + short, path + "interrupt") }, "Interrupt"),
          el("button", { type: "button", onclick: act("Restart " + short, path + "restart") }, "Restart"),
          el("button", { type: "button", class: "danger", onclick: act("Shut down " + short, path + "shutdown") }, "Shut down"),
        ),
      ),
    );
    return row;
  }

  function refreshRow(row, model) {
    kernelCells(model).forEach((cell, index) => row.cells[index].replaceWith(cell));
    row.dataset.state = model.state;
    row.querySelector("button[data-action='interrupt']").disabled = ["shutting_down", "gone", "failed"].includes(model.state);
  }

  function renderKernels() {
    const body = $("#kernels tbody");
    for (const [id, row] of rows) {
      if (!kernels.has(id)) {
        row.remove();
        rows.delete(id);
      }
    }
    let previous = null;
    for (const model of [...kernels.values()].sort((a, b) => (a.started < b.started ? -1 : 1))) {
      let row = rows.get(model.id);
      if (row === undefined) {
        row = kernelRow(model);
        rows.set(model.id, row);
      }
      refreshRow(row, model);
      // Moved only when out of place (a kernel listed for the first time).
      const expected = previous === null ? body.firstElementChild : previous.nextElementSibling;
      if (row !== expected) body.insertBefore(row, expected);
      previous = row;
    }
    $("#no-kernels").hidden = kernels.size > 0;
    $("#kernel-count").textContent = "(" + kernels.size + ")";
  }

  function renderSummary(summary) {
    if (summary.gateway) {
      $("#version").textContent = "version " + summary.gateway.version;
      skew = Date.parse(summary.gateway.now) - Date.now();
    }
    const q = summary.quotas || {};
    const limit = (n) => (n > 0 ? n : "none");
    $("#quotas").textContent =
      "Limits: gateway " + limit(q.max_kernels) + ", per user " + limit(q.max_kernels_per_user) +
      ", per group " + limit(q.max_kernels_per_group) + ", launches per user " + limit(q.max_concurrent_launches_per_user);
    const perUser = q.max_kernels_per_user > 0 ? " / " + q.max_kernels_per_user : "";
    $("#users tbody").replaceChildren(
      ...(summary.users || []).map((u) =>
        el("tr", {}, el("td", {}, u.user), el("td", {}, u.kernels + perUser), el("td", {}, u.launching), el("td", {}, u.groups.join(", "))),
      ),
    );
    const hosts = summary.hosts || [];
    $("#hosts tbody").replaceChildren(
      ...hosts.map((h) =>
        el(
          "tr",
          {},
          el("td", {}, h.launcher),
          el("td", {}, h.host),
          el("td", {}, el("span", { class: "badge " + (h.up ? "up" : "down") }, h.up ? "up" : "backed off")),
          el("td", {}, h.failures),
          el("td", {}, h.backoff_remaining ? h.backoff_remaining + " s" : ""),
          el("td", {}, h.kernels),
        ),
      ),
    );
    $("#no-hosts").hidden = hosts.length > 0;
    const store = summary.store || {};
    const facts = store.persistence
      ? [["Kind", store.kind], ["Shared", store.shared ? "yes" : "no"], ["Open", store.open ? "yes" : "no"],
         ["Keeps kernels across restarts", store.keeps_kernels ? "yes" : "no"], ["Unsaved records", store.unsaved]]
      : [["Persistence", "off (kernels end with the gateway)"]];
    $("#store").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  async function load() {
    const overview = await call("GET", "api/admin/overview");
    renderSummary(overview);
    kernels.clear();
    for (const model of overview.kernels) kernels.set(model.id, model);
    renderKernels();
  }

  function listen() {
    const live = $("#live");
    const source = new EventSource(base + "api/admin/events");
    let opened = false;
    source.addEventListener("open", () => {
      live.textContent = "live";
      live.className = "badge on";
      if (opened) load().catch((e) => say("Reloading: " + e.message, "error"));
      opened = true;
    });
    source.addEventListener("error", () => {
      live.textContent = "reconnecting…";
      live.className = "badge off";
    });
    source.addEventListener("kernel", (event) => {
      const model = JSON.parse(event.data);
      kernels.set(model.id, model);
      renderKernels();
    });
    source.addEventListener("removed", (event) => {
      kernels.delete(JSON.parse(event.data).id);
      renderKernels();
    });
    source.addEventListener("summary", (event) => renderSummary(JSON.parse(event.data)));
  }

  function showDrain(state) {
    const drain = $("#drain");
    drain.hidden = false;
    drain.dataset.draining = state.draining ? "yes" : "no";
    drain.textContent = state.draining ? "Undrain" : "Drain";
    drain.title = state.draining ? "Draining: new kernels are refused; click to admit them again" : "Refuse new kernels";
    $("#draining").hidden = !state.draining;
  }

  async function offerDrain() {
    // Drain is the health module's route; a gateway without it answers 404.
    const response = await fetch(base + "api/admin/drain", { credentials: "same-origin" });
    if (!response.ok) return;
    showDrain(await response.json());
    $("#drain").addEventListener("click", async (event) => {
      const button = event.currentTarget;
      const draining = button.dataset.draining === "yes";
      button.disabled = true;
      try {
        showDrain(await call(draining ? "DELETE" : "POST", "api/admin/drain"));
        say(draining ? "Undrained: new kernels are admitted" : "Draining: new kernels are refused");
      } catch (e) {
        say("Drain: " + e.message, "error");
      } finally {
        button.disabled = false;
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#cull").addEventListener("click", async (event) => {
      event.currentTarget.disabled = true;
      try {
        const result = await call("POST", "api/admin/cull");
        say("Cull now: " + result.culled + " kernel(s) culled");
      } catch (e) {
        say("Cull now: " + e.message, "error");
      } finally {
        $("#cull").disabled = false;
      }
    });
    load().then(listen, (e) => say("Loading the overview: " + e.message, "error"));
    offerDrain().catch(() => {});
    setInterval(() => {
      for (const cell of document.querySelectorAll("[data-since]")) cell.textContent = since(cell.dataset.since);
    }, 1000);
  });
})();
