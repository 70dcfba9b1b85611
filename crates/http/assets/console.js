// Bulwark web console: plain JavaScript, no dependencies, no build step.
//
// The page is public; everything it shows comes from the daemon's /api/v1 with the API token
// the user pasted (kept in sessionStorage, sent as "Authorization: Bearer"). Data is put into
// the page with textContent / DOM nodes only, never as HTML.
"use strict";

const TOKEN_KEY = "bulwark.token";
const SVGNS = "http://www.w3.org/2000/svg";

// ---------------------------------------------------------------------------------------
// Small DOM helpers.

/** An element with attributes (on* keys become listeners) and children (strings or nodes). */
function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  for (const k of kids.flat()) {
    if (k === null || k === undefined || k === false) continue;
    e.append(k instanceof Node ? k : String(k));
  }
  return e;
}

/** An SVG element with attributes. */
function s(tag, attrs, ...kids) {
  const e = document.createElementNS(SVGNS, tag);
  setAttrs(e, attrs);
  for (const k of kids.flat()) {
    if (k === null || k === undefined) continue;
    e.append(k instanceof Node ? k : String(k));
  }
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
}

const $ = (sel) => document.querySelector(sel);

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : 1)) + " " + u[i];
}

function fmtTime(t) {
  if (!t) return "–";
  const d = new Date(t);
  if (isNaN(d)) return String(t);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function timeEl(t) {
  return t ? h("time", { datetime: t }, fmtTime(t)) : "–";
}

/** A quoted shell word (for the CLI commands shown next to actions). */
function sq(word) {
  const w = String(word);
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(w) ? w : "'" + w.replace(/'/g, "'\\''") + "'";
}

function cli(...words) {
  return h("div", { class: "cli", "aria-label": "Equivalent command line" },
    words.filter((w) => w !== null).map(sq).join(" "));
}

/** `--api ORIGIN`: how the CLI reaches this same daemon. */
function apiArgs() {
  return ["--api", location.origin];
}

function stateBadge(state) {
  const cls = {
    Completed: "b-ok", CompletedWithWarnings: "b-warn", Failed: "b-bad", Cancelled: "b-warn",
    InProgress: "b-info", Skipped: "b-muted",
    completed: "b-ok", running: "b-info", pending: "b-muted", failed: "b-bad", cancelled: "b-warn",
    skipped: "b-muted",
    protected: "b-ok", overdue: "b-bad", never: "b-muted",
    ok: "b-ok", damaged: "b-bad", unverified: "b-muted",
  }[state] || "b-muted";
  return h("span", { class: "badge " + cls, "data-state": state }, state);
}

// ---------------------------------------------------------------------------------------
// Banners.

function showError(msg) {
  const e = $("#error");
  e.textContent = msg;
  e.hidden = false;
}

function clearError() {
  const e = $("#error");
  e.textContent = "";
  e.hidden = true;
}

function showStatus(...kids) {
  const e = $("#status");
  e.replaceChildren(...kids);
  e.hidden = false;
}

function clearStatus() {
  $("#status").hidden = true;
  $("#status").replaceChildren();
}

// ---------------------------------------------------------------------------------------
// The API.

class Unauthorized extends Error {}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new Unauthorized("not signed in");
  const headers = { Authorization: "Bearer " + token, Accept: "application/json" };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    throw new Error(`${method} ${path}: the daemon cannot be reached (${e.message})`);
  }
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401) throw new Unauthorized((data && data.error) || "the token was refused");
  if (!r.ok) {
    const why = (data && data.error) || r.statusText;
    const hint = r.status === 403 ? " (this token has the read scope; actions need an operator token)" : "";
    throw new Error(`${method} ${path}: ${r.status} ${why}${hint}`);
  }
  return data;
}

// ---------------------------------------------------------------------------------------
// Pages. Each page has render(params) -> Promise (builds the page and loads its data) and
// may return a refresh function that the poller calls every `every` milliseconds.

let poll = null;  // { timer, fn }
let generation = 0;  // bumped on each navigation: stale responses are dropped

function stopPolling() {
  if (poll) clearTimeout(poll.timer);
  poll = null;
}

function startPolling(fn, every) {
  stopPolling();
  const gen = generation;
  const tick = async () => {
    if (gen !== generation) return;
    try {
      await fn();
      if (gen === generation) clearError();
    } catch (e) {
      if (gen === generation) report(e);
    }
    if (gen === generation && poll) poll.timer = setTimeout(tick, every);
  };
  poll = { timer: setTimeout(tick, every) };
}

function report(e) {
  if (e instanceof Unauthorized) {
    signOut("The daemon refused the token (" + e.message + "): sign in again.");
  } else {
    showError(e.message || String(e));
  }
}

/** Replaces `el`'s children only when the data changed (keeps focus while polling). */
function swap(el, key, build) {
  if (el.dataset.key === key) return;
  const hadFocus = el.contains(document.activeElement) ? document.activeElement.id : null;
  el.replaceChildren(build());
  el.dataset.key = key;
  if (hadFocus) {
    const again = document.getElementById(hadFocus);
    if (again) again.focus();
  }
}

async function runNow(vm) {
  const r = await api("POST", `/api/v1/vms/${encodeURIComponent(vm)}/run`);
  showStatus(`Backup of ${vm} started: job ${r.job}. `, h("a", { href: "#/jobs" }, "Watch it on the Jobs page"), ".");
  return r;
}

// Overview: every VM, its last job, consistency, next run, and an "overdue" badge.
async function pageOverview(page) {
  page.append(
    h("h1", { tabindex: "-1" }, "Overview"),
    h("p", { class: "muted" }, "Every configured VM: its protection, last job and next scheduled run."),
  );
  const summary = h("p", { id: "overview-summary" });
  const holder = h("div", { id: "vm-table" });
  page.append(summary, holder,
    h("h2", {}, "Run a backup now from the command line"),
    cli("bulwark-controller", "run-now", "VM", ...apiArgs()));
  const load = async () => {
    const data = await api("GET", "/api/v1/vms");
    const vms = data.vms;
    const overdue = vms.filter((v) => v.protection.overdue).length;
    const failed = vms.filter((v) => v.last_job && v.last_job.state === "Failed").length;
    summary.textContent = `${vms.length} VMs · ${overdue} overdue · ${failed} whose last job failed`;
    swap(holder, JSON.stringify(vms.map((v) => [v.name, v.protection, v.last_job && [v.last_job.id, v.last_job.state, v.last_job.consistency], v.next_run, v.running_job])), () => vmTable(vms));
  };
  await load();
  return { refresh: load, every: 3000 };
}

function vmTable(vms) {
  return h("table", { id: "vms" },
    h("caption", {}, "Virtual machines"),
    h("thead", {}, h("tr", {},
      ["VM", "Protection", "Last job", "Consistency (reached / wanted)", "Last success", "Next run", "Policy", "Action"]
        .map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, vms.map((v) => {
      const j = v.last_job;
      return h("tr", { "data-vm": v.name },
        h("th", { scope: "row" }, h("a", { href: "#/vm/" + encodeURIComponent(v.name) }, v.name)),
        h("td", {}, stateBadge(v.protection.state),
          v.protection.overdue ? h("div", { class: "muted" }, "missed " + fmtTime(v.protection.missed_run)) : null),
        h("td", {}, j ? [stateBadge(j.state), " ", h("span", { class: "muted" }, "#" + j.id)] : h("span", { class: "muted" }, "none yet"),
          j && j.error ? h("div", { class: "form-error" }, j.error) : null),
        h("td", {}, (j && j.consistency) || "–", " / ", v.consistency_wanted),
        h("td", {}, timeEl(v.protection.last_success)),
        h("td", {}, timeEl(v.next_run), h("div", { class: "muted" }, v.schedule)),
        h("td", {}, v.policy),
        h("td", {}, h("button", {
          type: "button", id: "run-" + v.name, "data-action": "run-now", disabled: v.running_job ? true : null,
          "aria-label": "Run a backup of " + v.name + " now",
          onclick: async (ev) => {
            ev.target.disabled = true;
            try { await runNow(v.name); } catch (e) { report(e); ev.target.disabled = false; }
          },
        }, v.running_job ? "Running…" : "Run now")));
    })));
}

// A VM's page: facts, points (consistency, tier, size, verify state), verify and restore.
async function pageVm(page, name) {
  const [vm, storage] = await Promise.all([
    api("GET", `/api/v1/vms/${encodeURIComponent(name)}`),
    api("GET", "/api/v1/storage").catch(() => null),
  ]);
  const vault = storage ? storage.vault : "VAULT";
  page.append(
    h("p", {}, h("a", { href: "#/" }, "← Overview")),
    h("h1", { tabindex: "-1" }, "VM ", vm.name),
    h("dl", { class: "facts" },
      h("dt", {}, "Protection"), h("dd", { id: "vm-protection" }, stateBadge(vm.protection.state)),
      h("dt", {}, "Policy"), h("dd", {}, vm.policy),
      h("dt", {}, "Schedule"), h("dd", {}, vm.schedule),
      h("dt", {}, "Consistency"), h("dd", {}, `wanted ${vm.consistency_wanted}, minimum ${vm.consistency_minimum}`),
      h("dt", {}, "Next run"), h("dd", {}, timeEl(vm.next_run)),
      h("dt", {}, "Disks"), h("dd", {}, vm.disks.map((d) => `${d.name} (${d.path})`).join(", ")),
      h("dt", {}, "Guest agent"), h("dd", {}, vm.agent || "none")),
  );
  // Run now.
  page.append(
    h("h2", {}, "Back up now"),
    h("div", { class: "row" },
      h("button", {
        type: "button", id: "vm-run", onclick: async (ev) => {
          ev.target.disabled = true;
          try { await runNow(vm.name); } catch (e) { report(e); } finally { ev.target.disabled = false; }
        },
      }, "Run a backup now")),
    cli("bulwark-controller", "run-now", vm.name, ...apiArgs()));

  // Points.
  const points = h("div", { id: "points" });
  page.append(h("h2", { id: "points-title" }, "Recovery points"), points);

  // Verify.
  const verifyOut = h("div", { id: "verify-result", "aria-live": "polite" });
  page.append(
    h("h2", {}, "Verify"),
    h("p", { class: "muted" }, "Reads back every object these points need and checks its hash."),
    h("div", { class: "row" }, h("button", {
      type: "button", id: "vm-verify", onclick: async (ev) => {
        ev.target.disabled = true;
        verifyOut.textContent = "Verifying…";
        try {
          const r = await api("POST", "/api/v1/verify", { vm: vm.name });
          verifyOut.replaceChildren(r.ok
            ? h("p", {}, stateBadge("ok"), ` ${r.points} points, ${r.blocks} blocks, ${fmtBytes(r.bytes)} checked.`)
            : h("p", {}, stateBadge("damaged"), ` ${r.problems.length} problems; damaged points: ${r.broken_points.join(", ")}`));
          await loadPoints();
        } catch (e) { verifyOut.textContent = ""; report(e); } finally { ev.target.disabled = false; }
      },
    }, "Verify this VM's points")),
    verifyOut,
    cli("bulwark-controller", "verify", "--vault", vault, "--vm", vm.name));

  // Restore.
  const pointSel = h("select", { id: "restore-point", name: "point" });
  const diskSel = h("select", { id: "restore-disk", name: "disk" },
    vm.disks.map((d) => h("option", { value: d.name }, d.name)));
  const to = h("input", { id: "restore-to", name: "to", type: "text", size: 40, required: true, placeholder: "/var/lib/restore/disk.img" });
  const force = h("input", { id: "restore-force", name: "force", type: "checkbox" });
  const restoreCli = h("div", { id: "restore-cli" });
  const restoreOut = h("div", { id: "restore-result", "aria-live": "polite" });
  const updateCli = () => {
    restoreCli.replaceChildren(cli("bulwark-controller", "restore", "--vault", vault, "--vm", vm.name,
      "--point", pointSel.value || "latest", "--disk", diskSel.value, "--to", to.value || "PATH",
      force.checked ? "--force" : null));
  };
  for (const e of [pointSel, diskSel, to, force]) e.addEventListener("input", updateCli);
  const form = h("form", {
    id: "restore-form", onsubmit: async (ev) => {
      ev.preventDefault();
      const btn = form.querySelector("button");
      btn.disabled = true;
      restoreOut.textContent = "Restoring…";
      try {
        const r = await api("POST", `/api/v1/vms/${encodeURIComponent(vm.name)}/restore`,
          { point: pointSel.value, disk: diskSel.value, to: to.value, force: force.checked });
        restoreOut.replaceChildren(h("p", {}, stateBadge("completed"), " Restored to ", h("code", {}, to.value), ": ",
          h("code", {}, JSON.stringify(r))));
      } catch (e) { restoreOut.textContent = ""; report(e); } finally { btn.disabled = false; }
    },
  },
    h("div", { class: "row" },
      h("span", {}, h("label", { for: "restore-point" }, "Point"), pointSel),
      h("span", {}, h("label", { for: "restore-disk" }, "Disk"), diskSel),
      h("span", {}, h("label", { for: "restore-to" }, "To (a path on the daemon's host)"), to),
      h("span", {}, force, h("label", { for: "restore-force" }, " Replace an existing file"))),
    h("button", { type: "submit" }, "Restore"));
  page.append(h("h2", { id: "restore" }, "Restore a disk"),
    h("p", { class: "muted" }, "Writes one disk of a point to a raw image file on the daemon's host, verifying every block."),
    form, restoreCli, restoreOut);

  const pointKey = (list) => JSON.stringify(list.map((p) => [p.id, p.verify.state, p.tiers]));
  const fillPoints = (list, broken) => {
    swap(points, pointKey(list) + broken.length, () => pointsTable(vm, list, broken, (id) => {
      pointSel.value = id;
      updateCli();
      to.focus();
    }));
    const keep = pointSel.value;
    const key = JSON.stringify(list.map((p) => p.id));
    if (pointSel.dataset.key !== key) {
      pointSel.replaceChildren(h("option", { value: "latest" }, "latest"),
        ...list.map((p) => h("option", { value: p.id }, `${p.id} (${fmtTime(p.created)})`)));
      pointSel.dataset.key = key;
      pointSel.value = keep || "latest";
      if (!pointSel.value) pointSel.value = "latest";
    }
  };
  const loadPoints = async () => {
    const r = await api("GET", `/api/v1/vms/${encodeURIComponent(vm.name)}/points`);
    fillPoints(r.points, r.broken);
  };
  fillPoints(vm.points.points, vm.points.broken);
  updateCli();
  return { refresh: loadPoints, every: 5000 };
}

function pointsTable(vm, list, broken, pick) {
  const rows = list.map((p) => {
    const below = p.consistency.reached !== p.consistency.wanted;
    return h("tr", { "data-point": p.id },
      h("th", { scope: "row" }, h("code", {}, p.id)),
      h("td", {}, timeEl(p.created)),
      h("td", {}, h("span", { class: below ? "badge b-warn" : "badge b-ok" }, p.consistency.reached),
        " / ", p.consistency.wanted,
        p.consistency.reasons.length ? h("div", { class: "muted" }, p.consistency.reasons.join("; ")) : null),
      h("td", {}, p.tiers.join(" + ")),
      h("td", { class: "num" }, fmtBytes(p.size)),
      h("td", { class: "num" }, fmtBytes(p.bytes_uploaded)),
      h("td", {}, stateBadge(p.verify.state), p.verify.at ? h("div", { class: "muted" }, fmtTime(p.verify.at)) : null),
      h("td", {}, h("button", {
        type: "button", class: "secondary", "aria-label": `Restore from point ${p.id}`,
        onclick: () => pick(p.id),
      }, "Restore…")));
  });
  const t = h("table", { id: "points-table" },
    h("caption", {}, `${list.length} recovery points of ${vm.name}, newest first`),
    h("thead", {}, h("tr", {},
      ["Point", "Created", "Consistency (reached / wanted)", "Tier", "Size", "Uploaded", "Verify", "Action"]
        .map((c, i) => h("th", { scope: "col", class: i === 4 || i === 5 ? "num" : null }, c)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No recovery point yet."))));
  if (!broken.length) return t;
  return h("div", {}, t, h("p", { class: "form-error" },
    `${broken.length} manifests cannot be read: ` + broken.map((b) => `${b.key}: ${b.error}`).join("; ")));
}

// Jobs: live progress (polled every second), phase states, errors, cancel.
async function pageJobs(page) {
  page.append(h("h1", { tabindex: "-1" }, "Jobs"),
    h("p", { class: "muted" }, "Newest first; running jobs update every second."));
  const holder = h("div", { id: "jobs-table" });
  page.append(holder, h("h2", {}, "Cancel a running job from the command line"),
    cli("bulwark-controller", "jobs", "cancel", "ID", ...apiArgs()));
  const load = async () => {
    const data = await api("GET", "/api/v1/jobs?limit=100");
    swap(holder, JSON.stringify(data.jobs), () => jobsTable(data.jobs));
  };
  await load();
  return { refresh: load, every: 1000 };
}

function jobsTable(jobs) {
  return h("table", { id: "jobs" },
    h("caption", {}, `${jobs.length} most recent jobs`),
    h("thead", {}, h("tr", {},
      ["Job", "VM", "Trigger", "Started", "Ended", "Snapshot", "Transfer", "State", "Progress", "Consistency", "Read / uploaded", "Error", "Action"]
        .map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, jobs.map((j) => {
      let progress = "–";
      if (j.progress) {
        const pct = j.progress.total ? Math.floor((100 * j.progress.done) / j.progress.total) : 0;
        progress = h("span", {},
          h("progress", { max: j.progress.total || 1, value: j.progress.done, "aria-label": `Job ${j.id} progress` }),
          ` ${pct}% of ${fmtBytes(j.progress.total)}`);
      } else if (j.state === "Completed" || j.state === "CompletedWithWarnings") {
        progress = "100%";
      }
      return h("tr", { "data-job": j.id, "data-job-state": j.state, "data-vm": j.vm },
        h("th", { scope: "row" }, "#" + j.id),
        h("td", {}, h("a", { href: "#/vm/" + encodeURIComponent(j.vm) }, j.vm)),
        h("td", {}, j.trigger),
        h("td", {}, timeEl(j.started)),
        h("td", {}, timeEl(j.ended)),
        h("td", {}, stateBadge(j.snapshot)),
        h("td", {}, stateBadge(j.transfer)),
        h("td", {}, stateBadge(j.state), j.cancel_requested ? h("div", { class: "muted" }, "cancelling…") : null),
        h("td", {}, progress),
        h("td", {}, j.consistency || "–",
          j.consistency_reasons.length ? h("div", { class: "muted" }, j.consistency_reasons.join("; ")) : null),
        h("td", { class: "num" }, `${fmtBytes(j.bytes_read)} / ${fmtBytes(j.bytes_uploaded)}`),
        h("td", {}, j.error ? h("span", { class: "form-error" }, j.error) : ""),
        h("td", {}, j.state === "InProgress" && !j.cancel_requested ? h("button", {
          type: "button", class: "secondary", id: "cancel-" + j.id, "aria-label": `Cancel job ${j.id}`,
          onclick: async (ev) => {
            ev.target.disabled = true;
            try {
              await api("POST", `/api/v1/jobs/${j.id}/cancel`);
              showStatus(`Job ${j.id} is being cancelled (it stops at its next safe point).`);
            } catch (e) { report(e); ev.target.disabled = false; }
          },
        }, "Cancel") : ""));
    })));
}

// Storage: usage and deduplication factor over time, drawn as inline SVG.
async function pageStorage(page) {
  page.append(h("h1", { tabindex: "-1" }, "Storage"));
  const facts = h("div", { id: "storage-facts" });
  const plot = h("div", { id: "storage-plot" });
  page.append(facts, h("h2", {}, "Usage and deduplication over time"), plot);
  const load = async () => {
    const st = await api("GET", "/api/v1/storage");
    swap(facts, JSON.stringify([st.measured, st.stored_bytes]), () => h("dl", { class: "facts" },
      h("dt", {}, "Vault"), h("dd", {}, h("code", {}, st.vault), st.encrypted ? " (encrypted)" : ""),
      h("dt", {}, "Stored"), h("dd", { id: "stored-bytes" }, fmtBytes(st.stored_bytes), ` in ${st.objects} objects (${st.blocks} blocks)`),
      h("dt", {}, "Logical size of the points"), h("dd", {}, fmtBytes(st.logical_bytes), ` in ${st.points} points`),
      h("dt", {}, "Deduplication factor"), h("dd", { id: "dedup-factor" }, st.dedup_factor ? st.dedup_factor.toFixed(2) + "×" : "–"),
      h("dt", {}, "Growth"), h("dd", {}, st.growth_bytes_per_day === null || st.growth_bytes_per_day === undefined ? "not enough history yet" : fmtBytes(st.growth_bytes_per_day) + " per day"),
      h("dt", {}, "Measured"), h("dd", {}, timeEl(st.measured))));
    swap(plot, JSON.stringify(st.history), () => storagePlot(st.history));
  };
  await load();
  return { refresh: load, every: 15000 };
}

function storagePlot(history) {
  const pts = history.map((x) => ({
    t: new Date(x.at).getTime(),
    stored: x.stored_bytes,
    logical: x.logical_bytes,
    dedup: x.stored_bytes > 0 ? x.logical_bytes / x.stored_bytes : null,
  })).filter((p) => !isNaN(p.t)).sort((a, b) => a.t - b.t);
  if (!pts.length) return h("p", { class: "muted" }, "No measurement yet: one is taken after every job.");
  const W = 860, H1 = 220, H2 = 140, L = 78, R = 20, T = 14, GAP = 46, B = 34;
  const H = T + H1 + GAP + H2 + B;
  let t0 = pts[0].t, t1 = pts[pts.length - 1].t;
  if (t1 - t0 < 60000) { t0 -= 30000; t1 += 30000; }
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const maxB = Math.max(1, ...pts.map((p) => Math.max(p.stored, p.logical))) * 1.1;
  const y1 = (v) => T + H1 - (v / maxB) * H1;
  const dedups = pts.map((p) => p.dedup).filter((d) => d !== null);
  const maxD = Math.max(1.5, ...dedups) * 1.1;
  const top2 = T + H1 + GAP;
  const y2 = (v) => top2 + H2 - (v / maxD) * H2;
  const line = (f, key, cls) => {
    const seg = pts.filter((p) => p[key] !== null).map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${f(p[key]).toFixed(1)}`);
    return seg.length ? s("path", { d: seg.join(" "), class: cls }) : null;
  };
  const kids = [];
  // Grid and y labels.
  for (let i = 0; i <= 4; i++) {
    const v = (maxB * i) / 4, yy = y1(v);
    kids.push(s("line", { x1: L, x2: W - R, y1: yy, y2: yy, class: "grid" }),
      s("text", { x: L - 6, y: yy + 4, "text-anchor": "end" }, fmtBytes(v)));
    const d = (maxD * i) / 4, yd = y2(d);
    kids.push(s("line", { x1: L, x2: W - R, y1: yd, y2: yd, class: "grid" }),
      s("text", { x: L - 6, y: yd + 4, "text-anchor": "end" }, d.toFixed(1) + "×"));
  }
  // Time labels (shared x axis).
  for (let i = 0; i <= 4; i++) {
    const t = t0 + ((t1 - t0) * i) / 4;
    const label = new Date(t).toISOString().slice(5, 16).replace("T", " ");
    kids.push(s("text", { x: x(t), y: H - 10, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, label));
  }
  kids.push(
    s("line", { x1: L, x2: L, y1: T, y2: T + H1, class: "axis" }),
    s("line", { x1: L, x2: W - R, y1: T + H1, y2: T + H1, class: "axis" }),
    s("line", { x1: L, x2: L, y1: top2, y2: top2 + H2, class: "axis" }),
    s("line", { x1: L, x2: W - R, y1: top2 + H2, y2: top2 + H2, class: "axis" }),
    s("text", { x: L, y: top2 - 8 }, "Deduplication factor (logical ÷ stored)"),
    line(y1, "logical", "logical"),
    line(y1, "stored", "stored"),
    line(y2, "dedup", "dedup"));
  for (const p of pts) {
    kids.push(s("circle", { cx: x(p.t), cy: y1(p.stored), r: 3, class: "stored" }));
    if (p.dedup !== null) kids.push(s("circle", { cx: x(p.t), cy: y2(p.dedup), r: 3, class: "dedup" }));
  }
  const last = pts[pts.length - 1];
  const desc = `${pts.length} measurements from ${fmtTime(new Date(pts[0].t).toISOString())} to ${fmtTime(new Date(last.t).toISOString())}; ` +
    `now ${fmtBytes(last.stored)} stored for ${fmtBytes(last.logical)} of points` + (last.dedup ? `, deduplication ${last.dedup.toFixed(2)}×.` : ".");
  const svg = s("svg", { class: "plot", id: "storage-svg", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-labelledby": "plot-title plot-desc" },
    s("title", { id: "plot-title" }, "Vault usage and deduplication factor over time"),
    s("desc", { id: "plot-desc" }, desc),
    kids);
  const table = h("details", {},
    h("summary", {}, "The measurements as a table"),
    h("table", { id: "storage-samples" },
      h("thead", {}, h("tr", {}, ["Measured", "Stored", "Logical", "Deduplication"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, pts.slice().reverse().map((p) => h("tr", {},
        h("td", {}, fmtTime(new Date(p.t).toISOString())),
        h("td", { class: "num" }, fmtBytes(p.stored)),
        h("td", { class: "num" }, fmtBytes(p.logical)),
        h("td", { class: "num" }, p.dedup ? p.dedup.toFixed(2) + "×" : "–"))))));
  return h("div", {},
    h("div", { class: "legend", "aria-hidden": "true" },
      h("span", { class: "l-stored" }, "stored bytes"),
      h("span", { class: "l-logical" }, "logical bytes of the points"),
      h("span", { class: "l-dedup" }, "deduplication factor")),
    svg, table);
}

// ---------------------------------------------------------------------------------------
// Navigation and sign-in.

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopPolling();
  generation++;
  clearStatus();
  clearError();
  $("#page").replaceChildren();
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-msg").textContent = message || "";
  document.title = "Sign in · Bulwark console";
  $("#token").focus();
}

async function route() {
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    signOut("");
    return;
  }
  stopPolling();
  const gen = ++generation;
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  const hash = location.hash.replace(/^#/, "") || "/";
  const parts = hash.split("/").filter(Boolean);
  let render, title, current;
  if (parts.length === 0) { render = (p) => pageOverview(p); title = "Overview"; current = "overview"; }
  else if (parts[0] === "jobs") { render = (p) => pageJobs(p); title = "Jobs"; current = "jobs"; }
  else if (parts[0] === "storage") { render = (p) => pageStorage(p); title = "Storage"; current = "storage"; }
  else if (parts[0] === "vm" && parts[1]) {
    const name = decodeURIComponent(parts[1]);
    render = (p) => pageVm(p, name); title = "VM " + name; current = "overview";
  } else { render = null; title = "Not found"; }
  document.title = title + " · Bulwark console";
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const page = h("div", { "data-page": current || "none", "aria-busy": "true" });
  $("#page").replaceChildren(page);
  if (!render) {
    page.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Go to the overview")));
    page.removeAttribute("aria-busy");
    return;
  }
  try {
    const next = await render(page);
    if (gen !== generation) return;
    page.removeAttribute("aria-busy");
    page.dataset.loaded = "true";
    clearError();
    const h1 = page.querySelector("h1");
    if (h1 && document.activeElement === document.body) h1.focus();
    if (next && next.refresh) startPolling(next.refresh, next.every);
  } catch (e) {
    if (gen !== generation) return;
    page.removeAttribute("aria-busy");
    report(e);
  }
}

async function signIn(ev) {
  ev.preventDefault();
  const token = $("#token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("GET", "/api/v1/vms");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#login-msg").textContent = e instanceof Unauthorized
      ? "The daemon refused this token: check it and try again."
      : "Cannot sign in: " + e.message;
    return;
  }
  $("#token").value = "";
  $("#login-msg").textContent = "";
  await route();
  const h1 = $("#page h1");
  if (h1) h1.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", signIn);
  $("#logout").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", () => { clearStatus(); route(); });
  route();
});
