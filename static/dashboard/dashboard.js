/* The operator dashboard: live jobs from /ws/events, one job's stages and logs from
   /ws/jobs/{id}, queues, workers, engines and the GPU from the /v1 API.
   Plain JS, no build step. Every value from the server goes into the page as text. */
(function () {
  "use strict";

  const MAX_ROWS = 200;
  const MAX_LOG_LINES = 1000;
  const MAX_FAILURES = 10;
  const POLL_MS = 5000;
  const FAILURES_POLL_MS = 30000;
  const BUCKET_MS = 10000;
  const BUCKETS = 60;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  // Ids a socket remembers, to drop rows sent again after a reconnect.
  const SEEN_IDS = 5000;

  const ACTIVE = new Set(["pending", "running", "retrying"]);
  const RETRYABLE = new Set(["failed", "cancelled", "timed_out"]);
  const FINISHED = new Set(["completed", "failed", "cancelled", "timed_out"]);

  const state = {
    jobs: new Map(),
    // The highest activity row applied to each job and stage: rows of one job are
    // written under its lock, so an older id never carries a newer state.
    jobRow: new Map(),
    stageRow: new Map(),
    completions: [],
    engines: new Map(),
    pipelines: new Set(),
    selected: null,
    jobSocket: null,
    skewMs: 0,
    sessionLost: false,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children || []) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  // --- Formatting ---------------------------------------------------------------------

  const shortId = (id) => String(id).slice(0, 8);
  const statusLabel = (status) => String(status || "unknown").replace(/_/g, " ");
  const serverNow = () => Date.now() + state.skewMs;

  function pct(value) {
    const number = Number(value);
    if (!Number.isFinite(number)) return 0;
    return Math.max(0, Math.min(100, number));
  }

  function clockTime(iso) {
    const ms = Date.parse(iso);
    if (Number.isNaN(ms)) return "";
    return new Date(ms - state.skewMs).toLocaleTimeString([], { hour12: false });
  }

  function duration(ms) {
    if (ms === null || ms === undefined || !Number.isFinite(Number(ms))) return "–";
    const s = Number(ms) / 1000;
    if (s === 0) return "0 s";
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 120) return `${Math.round(s)} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    return `${Math.round(s / 3600)} h`;
  }

  function ageOf(iso) {
    const ms = Date.parse(iso);
    if (Number.isNaN(ms)) return "never";
    return `${duration(Math.max(0, serverNow() - ms))} ago`;
  }

  function notice(message, kind) {
    const node = $("notice");
    node.textContent = message;
    node.dataset.kind = kind || "info";
  }

  // --- The /v1 API --------------------------------------------------------------------

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (match) return decodeURIComponent(match[1]);
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  class ApiError extends Error {
    constructor(message, status, envelope) {
      super(message);
      this.status = status;
      this.envelope = envelope;
    }
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      init.headers["X-CSRFToken"] = csrfToken();
      init.body = JSON.stringify(body || {});
    }
    const response = await fetch(path, init);
    let envelope = null;
    try {
      envelope = await response.json();
    } catch (_) {
      envelope = null;
    }
    const generated = envelope && envelope.meta && Date.parse(envelope.meta.generated_at);
    if (generated) state.skewMs = generated - Date.now();
    if (!response.ok || !envelope || envelope.status !== "success") {
      const error = envelope && envelope.error;
      const message = error ? `${error.code}: ${error.message}` : `HTTP ${response.status}`;
      if (response.status === 401 || response.status === 403) sessionLost();
      throw new ApiError(message, response.status, envelope);
    }
    return envelope;
  }

  function sessionLost() {
    if (state.sessionLost) return;
    state.sessionLost = true;
    notice("Your session has ended or lacks staff rights: log in again and reload this page.", "error");
  }

  // --- The live sockets ---------------------------------------------------------------

  /* One websocket that reconnects with backoff and resumes from the highest cursor it
     received; rows it already applied (same id) are dropped. */
  class LiveSocket {
    constructor(path, handlers) {
      this.path = path;
      this.handlers = handlers;
      this.cursor = null;
      this.seen = new Set();
      this.failures = 0;
      this.ws = null;
      this.timer = null;
      this.stopped = false;
    }

    url() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const after = this.cursor === null ? "" : `?after=${this.cursor}`;
      return `${scheme}//${location.host}${this.path}${after}`;
    }

    open() {
      clearTimeout(this.timer);
      this.timer = null;
      if (this.stopped) return;
      this.handlers.onState("connecting");
      let ws;
      try {
        ws = new WebSocket(this.url());
      } catch (_) {
        this.retry(1006);
        return;
      }
      this.ws = ws;
      ws.onopen = () => this.handlers.onState("live");
      ws.onmessage = (event) => {
        this.failures = 0;
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (_) {
          return;
        }
        this.receive(message);
      };
      ws.onclose = (event) => {
        if (this.ws !== ws) return;
        this.ws = null;
        if (!this.stopped) this.retry(event.code);
      };
    }

    receive(message) {
      if (message.type === "snapshot") {
        this.seen.clear();
        if (Number.isInteger(message.cursor)) this.cursor = message.cursor;
        this.handlers.onSnapshot(message);
        return;
      }
      if (Number.isInteger(message.id)) {
        if (this.seen.has(message.id)) return;
        this.seen.add(message.id);
        if (this.seen.size > SEEN_IDS) this.seen.delete(this.seen.values().next().value);
      }
      // A change's id is the cursor to resume from (the server delivers them in order).
      if (Number.isInteger(message.id) && (this.cursor === null || message.id > this.cursor)) {
        this.cursor = message.id;
      }
      this.handlers.onRow(message);
    }

    retry(code) {
      if (code === 4001 || code === 4003) {
        this.handlers.onState("refused", code);
        return;
      }
      if (code === 4004) {
        this.handlers.onState("gone", code);
        return;
      }
      if (code === 4400) this.cursor = null;
      const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.failures);
      const delay = Math.round(base * (0.75 + Math.random() * 0.5));
      this.failures += 1;
      this.handlers.onState("reconnecting", delay);
      this.timer = setTimeout(() => this.open(), delay);
    }

    reconnectNow() {
      if (this.timer !== null && !this.stopped) this.open();
    }

    stop() {
      this.stopped = true;
      clearTimeout(this.timer);
      const ws = this.ws;
      this.ws = null;
      if (ws) ws.close(1000);
    }
  }

  // --- Applying what the server says --------------------------------------------------

  function isNewer(map, key, rowId) {
    if (!Number.isInteger(rowId)) return true;
    const last = map.get(key);
    if (last !== undefined && rowId < last) return false;
    map.set(key, rowId);
    return true;
  }

  /* A snapshot is read after every row its cursor covers, and after any row its socket
     was sent before it: it always applies, and rows from the cursor on apply after it. */
  function raiseTo(map, key, cursor) {
    if (Number.isInteger(cursor) && !(map.get(key) > cursor)) map.set(key, cursor);
  }

  function noteCompletion(job) {
    let at = Date.parse(job.finished_at || job.updated_at) - state.skewMs;
    if (Number.isNaN(at) || at > Date.now()) at = Date.now();
    state.completions.push(at);
  }

  /* A job as the server states it: a row's summary (rowId), a snapshot's full job
     (snapshotCursor), or an API reply (neither). */
  function applyJob(data, rowId, snapshotCursor) {
    if (!data || !data.id) return;
    const id = String(data.id);
    if (snapshotCursor !== undefined) raiseTo(state.jobRow, id, snapshotCursor);
    else if (!isNewer(state.jobRow, id, rowId)) return;
    const previous = state.jobs.get(id);
    const job = Object.assign({}, previous || {}, data, { id });
    job.stages = Array.isArray(data.stages)
      ? data.stages.map((stage) => Object.assign({}, stage))
      : (previous && previous.stages) || [];
    if (!job.created_at) job.created_at = data.updated_at || new Date(serverNow()).toISOString();
    if (previous && FINISHED.has(previous.status) && job.status === "pending" && !data.stages) {
      // A retry reruns the stages that did not complete, from the start.
      for (const stage of job.stages) {
        if (stage.status !== "completed") Object.assign(stage, { status: "waiting", progress: 0, error: null });
      }
    }
    if (job.status === "completed" && (!previous || previous.status !== "completed")) noteCompletion(job);
    state.jobs.set(id, job);
    if (job.pipeline) addPipeline(job.pipeline);
    if (!previous) pruneJobs();
    scheduleRender();
  }

  function applyStage(data, rowId) {
    if (!data || !data.job_id || !data.name) return;
    const jobId = String(data.job_id);
    const job = state.jobs.get(jobId);
    if (!job || !isNewer(state.stageRow, `${jobId}/${data.name}`, rowId)) return;
    const stages = job.stages || (job.stages = []);
    const stage = stages.find((s) => s.name === data.name);
    if (stage) Object.assign(stage, data);
    else stages.push(Object.assign({}, data));
    scheduleRender();
  }

  /* A dashboard left open for days must not keep every job it ever saw: the oldest
     finished ones go (the API still lists them). */
  const KEEP_JOBS = 2000;

  function pruneJobs() {
    if (state.jobs.size <= KEEP_JOBS * 1.25) return;
    const finished = Array.from(state.jobs.values())
      .filter((job) => FINISHED.has(job.status) && job.id !== state.selected)
      .sort((a, b) => (Date.parse(a.created_at) || 0) - (Date.parse(b.created_at) || 0));
    const drop = new Set(finished.slice(0, state.jobs.size - KEEP_JOBS).map((job) => job.id));
    for (const id of drop) {
      state.jobs.delete(id);
      state.jobRow.delete(id);
    }
    for (const key of state.stageRow.keys()) {
      if (drop.has(key.slice(0, key.indexOf("/")))) state.stageRow.delete(key);
    }
  }

  function forgetJob(id) {
    id = String(id);
    state.jobs.delete(id);
    if (state.selected === id) closeDetail();
    scheduleRender();
  }

  /* Jobs the API listed: only ones the live stream has not told us about, since a
     reply may be older than a row already applied. */
  function mergeListed(jobs) {
    for (const job of jobs || []) {
      if (!state.jobs.has(String(job.id))) applyJob(job, null);
    }
  }

  function applyEngine(data, removed) {
    if (!data || data.id === undefined) return;
    if (removed) state.engines.delete(String(data.id));
    else state.engines.set(String(data.id), Object.assign({}, state.engines.get(String(data.id)), data));
    renderEngines();
  }

  function onEventsRow(message) {
    const data = message.data || {};
    switch (message.type) {
      case "job:update":
      case "job:progress":
        applyJob(data, message.id);
        break;
      case "stage:update":
        applyStage(data, message.id);
        break;
      case "job:deleted":
        forgetJob(data.id || message.job_id);
        break;
      case "engine:update":
        applyEngine(data, false);
        break;
      case "engine:deregistered":
        applyEngine(data, true);
        break;
      case "metrics":
        renderMetrics(data);
        break;
      default:
        break; // logs stream through the job's own socket; events are not shown here
    }
  }

  const events = new LiveSocket("/ws/events", {
    onSnapshot(message) {
      for (const job of (message.data || {}).jobs || []) applyJob(job, null, message.cursor);
      pruneJobs();
    },
    onRow: onEventsRow,
    onState(kind, detail) {
      const badge = $("connection");
      badge.dataset.state = kind;
      if (kind === "reconnecting") badge.textContent = `reconnecting in ${Math.ceil(detail / 1000)} s`;
      else if (kind === "refused") {
        badge.textContent = "refused";
        sessionLost();
      } else badge.textContent = kind;
    },
  });

  // --- The job detail pane ------------------------------------------------------------

  function openDetail(id, focus) {
    id = String(id);
    if (state.selected !== id) {
      if (state.jobSocket) state.jobSocket.stop();
      state.selected = id;
      $("logs").replaceChildren();
      const socket = new LiveSocket(`/ws/jobs/${encodeURIComponent(id)}`, {
        onSnapshot(message) {
          const data = message.data || {};
          applyJob(data.job, null, message.cursor);
          $("logs").replaceChildren();
          appendLogs(data.logs || []);
        },
        onRow(message) {
          if (message.type === "log") appendLogs([message.data || {}]);
          else if (message.type === "job:deleted") forgetJob(id);
          else onEventsRow(message);
          if (message.type === "job:progress") refreshStageProgressSoon(id);
        },
        onState(kind) {
          $("detail").dataset.stream = kind;
          if (kind === "gone") notice(`Job ${shortId(id)} no longer exists.`, "error");
        },
      });
      state.jobSocket = socket;
      socket.open();
    }
    $("detail").hidden = false;
    renderDetail();
    renderJobs();
    if (focus) $("detail-title").focus();
  }

  function closeDetail() {
    if (state.jobSocket) state.jobSocket.stop();
    state.jobSocket = null;
    state.selected = null;
    $("detail").hidden = true;
    renderJobs();
  }

  /* A stage's checkpoint reaches the stream only as its job's progress (no stage row),
     so the open job's running stages take theirs from the API, at most once a second. */
  let stageRefresh = null;

  function refreshStageProgressSoon(id) {
    if (stageRefresh !== null) return;
    stageRefresh = setTimeout(async () => {
      try {
        const reply = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
        const job = state.jobs.get(id);
        for (const fresh of (job && reply.data.stages) || []) {
          const stage = job.stages.find((s) => s.name === fresh.name);
          if (stage && stage.status === "running" && fresh.status === "running") stage.progress = fresh.progress;
        }
        scheduleRender();
      } catch (_) {
        // the next checkpoint tries again
      } finally {
        stageRefresh = null;
      }
    }, 1000);
  }

  function appendLogs(lines) {
    const list = $("logs");
    const follow = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    for (const line of lines) {
      const level = String(line.level || "info");
      list.append(
        el("li", { class: `log level-${level}` }, [
          el("time", { datetime: line.at, text: clockTime(line.at) }),
          el("span", { class: "log-level", text: level }),
          line.stage ? el("span", { class: "log-stage", text: line.stage }) : null,
          el("span", { class: "log-message", text: line.message || "" }),
        ]),
      );
    }
    while (list.childElementCount > MAX_LOG_LINES) list.firstElementChild.remove();
    if (follow) list.scrollTop = list.scrollHeight;
  }

  // --- Actions ------------------------------------------------------------------------

  async function act(action, id, button) {
    const job = state.jobs.get(id);
    const before = job && job.status;
    if (button) button.disabled = true;
    try {
      const reply = await api("POST", `/v1/jobs/${encodeURIComponent(id)}/${action}`, {});
      const current = state.jobs.get(id);
      // The live stream may already have moved the job on; the reply is older then.
      if (!current || current.status === before) applyJob(reply.data, null);
      const verb = action === "cancel" ? "Cancel requested for" : "Retrying";
      notice(`${verb} job ${shortId(id)} (${statusLabel(reply.data.status)}).`, "info");
    } catch (error) {
      notice(`Could not ${action} job ${shortId(id)}: ${error.message}`, "error");
    } finally {
      if (button) button.disabled = false;
      scheduleRender();
    }
  }

  // --- Rendering ----------------------------------------------------------------------

  let renderTimer = null;

  function scheduleRender() {
    if (renderTimer !== null) return;
    renderTimer = setTimeout(() => {
      renderTimer = null;
      renderJobs();
      renderDetail();
      renderFailures();
      renderThroughput();
    }, 50);
  }

  function progressBar(value, label, status) {
    const bar = el("div", {
      class: "progress",
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-label": label,
    });
    bar.append(el("span", { class: "fill" }), el("span", { class: "pct" }));
    setProgress(bar, value, status);
    return bar;
  }

  function setProgress(bar, value, status) {
    const v = Math.round(pct(value));
    if (bar.getAttribute("aria-valuenow") !== String(v)) {
      bar.setAttribute("aria-valuenow", String(v));
      bar.querySelector(".fill").style.width = `${v}%`;
      bar.querySelector(".pct").textContent = `${v}%`;
    }
    bar.dataset.status = status || "";
  }

  function statusBadge(node, status) {
    node.textContent = statusLabel(status);
    node.className = `status status-${status || "unknown"}`;
  }

  function visibleJobs() {
    const wantStatus = $("filter-status").value;
    const wantPipeline = $("filter-pipeline").value;
    return Array.from(state.jobs.values())
      .filter((job) => (!wantStatus || job.status === wantStatus) && (!wantPipeline || job.pipeline === wantPipeline))
      .sort((a, b) => (Date.parse(b.created_at) || 0) - (Date.parse(a.created_at) || 0))
      .slice(0, MAX_ROWS);
  }

  const rows = new Map();

  function jobRow(id) {
    let tr = rows.get(id);
    if (tr) return tr;
    const short = shortId(id);
    tr = el("tr", { "data-job-id": id }, [
      el("td", {}, [
        el("button", { type: "button", class: "link", "data-action": "open", "aria-label": `Show job ${id}` }, [
          el("code", { text: short }),
        ]),
      ]),
      el("td", { class: "pipeline" }),
      el("td", {}, [el("span", { class: "status" })]),
      el("td", {}, [progressBar(0, `Progress of job ${short}`, "")]),
      el("td", {}, [el("time", { class: "updated" })]),
      el("td", { class: "actions" }, [
        el("button", { type: "button", "data-action": "cancel", "aria-label": `Cancel job ${short}`, text: "Cancel" }),
        el("button", { type: "button", "data-action": "retry", "aria-label": `Retry job ${short}`, text: "Retry" }),
      ]),
    ]);
    rows.set(id, tr);
    return tr;
  }

  function renderJobs() {
    const body = $("jobs-body");
    const jobs = visibleJobs();
    const wanted = new Set();
    jobs.forEach((job, index) => {
      const tr = jobRow(job.id);
      wanted.add(job.id);
      tr.dataset.status = job.status || "";
      tr.classList.toggle("selected", job.id === state.selected);
      tr.querySelector(".pipeline").textContent = job.pipeline || "";
      statusBadge(tr.querySelector(".status"), job.status);
      setProgress(tr.querySelector(".progress"), job.progress, job.status);
      const updated = job.updated_at || job.finished_at || job.started_at || job.created_at;
      const time = tr.querySelector("time.updated");
      time.setAttribute("datetime", updated || "");
      time.textContent = clockTime(updated);
      tr.querySelector('[data-action="cancel"]').hidden = !ACTIVE.has(job.status);
      tr.querySelector('[data-action="retry"]').hidden = !RETRYABLE.has(job.status);
      if (body.children[index] !== tr) body.insertBefore(tr, body.children[index] || null);
    });
    for (const [id, tr] of rows) {
      if (!wanted.has(id)) {
        tr.remove();
        if (!state.jobs.has(id)) rows.delete(id);
      }
    }
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs-empty").textContent = state.jobs.size ? "No jobs match these filters." : "No jobs yet.";
  }

  function renderDetail() {
    if (!state.selected) return;
    const job = state.jobs.get(state.selected) || { id: state.selected, stages: [] };
    $("detail").dataset.jobId = job.id;
    $("detail-id").textContent = shortId(job.id);
    $("detail-id").title = job.id;
    $("detail-pipeline").textContent = job.pipeline || "";
    statusBadge($("detail-status"), job.status);
    const progress = $("detail-progress");
    if (!progress.firstChild) progress.append(progressBar(0, "Job progress", ""));
    setProgress(progress.firstChild, job.progress, job.status);
    $("detail-attempts").textContent = job.attempts === undefined ? "" : String(job.attempts);
    $("detail-error").textContent = job.error ? `${job.error.code || "ERROR"}: ${job.error.message || ""}` : "–";
    $("detail-cancel").disabled = !ACTIVE.has(job.status);
    $("detail-retry").disabled = !RETRYABLE.has(job.status);
    const stages = job.stages || [];
    const signature = JSON.stringify([job.id, stages.map((s) => [s.name, s.status, s.attempt, s.progress, s.worker])]);
    if ($("stages-body").dataset.signature === signature) return;
    $("stages-body").dataset.signature = signature;
    $("stages-body").replaceChildren(
      ...stages.map((stage) => {
        const badge = el("span");
        statusBadge(badge, stage.status);
        return el("tr", { "data-stage": stage.name }, [
          el("th", { scope: "row", text: stage.name }),
          el("td", {}, [badge]),
          el("td", { text: stage.attempt === undefined ? "" : stage.attempt }),
          el("td", {}, [progressBar(stage.progress, `Progress of stage ${stage.name}`, stage.status)]),
          el("td", { class: "worker", text: stage.worker || "" }),
        ]);
      }),
    );
  }

  function renderFailures() {
    const failed = Array.from(state.jobs.values())
      .filter((job) => job.status === "failed")
      .sort((a, b) => (Date.parse(b.updated_at || b.finished_at) || 0) - (Date.parse(a.updated_at || a.finished_at) || 0))
      .slice(0, MAX_FAILURES);
    const signature = JSON.stringify(failed.map((job) => [job.id, job.updated_at, job.error]));
    if ($("failures-list").dataset.signature === signature) return;
    $("failures-list").dataset.signature = signature;
    $("failures-list").replaceChildren(
      ...failed.map((job) => {
        const error = job.error || {};
        return el("li", { "data-job-id": job.id }, [
          el("button", { type: "button", class: "link", "data-action": "open", "aria-label": `Show job ${job.id}` }, [
            el("code", { text: shortId(job.id) }),
          ]),
          el("span", { class: "pipeline", text: job.pipeline || "" }),
          el("code", { class: "error-code", text: error.code || "ERROR" }),
          el("span", { class: "error-message", text: error.message || "" }),
          el("time", { datetime: job.updated_at || job.finished_at, text: clockTime(job.updated_at || job.finished_at) }),
        ]);
      }),
    );
    $("failures-empty").hidden = failed.length > 0;
  }

  function renderMetrics(metrics) {
    const queues = metrics.queues || {};
    $("queues-body").replaceChildren(
      ...Object.entries(queues).map(([name, q]) =>
        el("tr", { "data-queue": name }, [
          el("th", { scope: "row", text: name }),
          el("td", { class: "depth", text: q.depth }),
          el("td", { text: q.ready === undefined ? "" : q.ready }),
          el("td", { text: q.leased === undefined ? "" : q.leased }),
          el("td", { class: "lag", text: duration(q.lag_ms) }),
        ]),
      ),
    );
    const jobs = metrics.jobs;
    if (jobs) {
      const rate = jobs.success_rate === null || jobs.success_rate === undefined ? "–" : `${Math.round(jobs.success_rate * 100)}%`;
      $("job-counts").textContent =
        `${jobs.total} jobs: ${jobs.pending} pending, ${jobs.running} running, ${jobs.completed} completed, ` +
        `${jobs.failed} failed, ${jobs.cancelled} cancelled; success rate ${rate}; ` +
        `average ${duration(jobs.average_job_time_ms)}`;
    }
  }

  function renderHealth(report) {
    const badge = $("health-status");
    badge.textContent = report.status || "unknown";
    badge.dataset.state = report.status || "unknown";
    const checks = report.checks || {};
    const workers = checks.workers || {};
    const clusters = workers.clusters || [];
    $("workers-list").replaceChildren(
      ...(clusters.length
        ? clusters.map((c) =>
            el("li", { "data-cluster": c.cluster_id }, [
              el("span", { class: `status status-${c.status === "Idle" || c.status === "Working" ? "ok" : "unknown"}`, text: c.status || "?" }),
              el("code", { text: shortId(c.cluster_id || "") }),
              el("span", { text: ` ${c.host || ""} · ${c.workers} workers · up ${duration((c.uptime_s || 0) * 1000)}` }),
            ]),
          )
        : [el("li", { class: "empty", text: workers.detail || "no worker cluster is running" })]),
    );
    renderGpu(checks.gpu);
  }

  function renderGpu(gpu) {
    const body = $("gpu-body");
    if (!gpu || !gpu.device) {
      body.replaceChildren(el("p", { class: "empty", text: (gpu && gpu.detail) || "no GPU worker reporting" }));
      return;
    }
    const badge = el("span");
    statusBadge(badge, gpu.status);
    const facts = el("dl", { class: "facts" });
    const fact = (name, value) => facts.append(el("dt", { text: name }), el("dd", { text: value }));
    fact("device", `${gpu.name || ""} (${gpu.device}${gpu.half_precision ? ", fp16" : ""})`);
    if (gpu.memory_total_mb) {
      const share = Math.round((100 * gpu.memory_used_mb) / gpu.memory_total_mb);
      fact("memory", `${gpu.memory_used_mb} / ${gpu.memory_total_mb} MiB (${share}%)`);
    }
    fact("utilization", gpu.utilization_pct == null ? "not reported by the driver" : `${gpu.utilization_pct}%`);
    fact("models", (gpu.models || []).join(", ") || "none loaded yet");
    for (const [kind, stats] of Object.entries(gpu.batches || {})) {
      fact(
        kind.replace(/_/g, " "),
        `${stats.forward_passes} passes, mean ${stats.mean_batch}, last ${stats.last_batch} in ${stats.last_batch_ms} ms`,
      );
    }
    fact("workers", String((gpu.workers || []).length));
    fact("reported", ageOf(gpu.reported_at));
    body.replaceChildren(el("p", {}, ["Status: ", badge]), facts);
  }

  function renderEngines() {
    const engines = Array.from(state.engines.values()).sort((a, b) => String(a.name).localeCompare(String(b.name)));
    $("engines-body").replaceChildren(
      ...engines.map((engine) => {
        const badge = el("span");
        statusBadge(badge, engine.status);
        return el("tr", { "data-engine-id": engine.id }, [
          el("th", { scope: "row", class: "name", text: engine.name || engine.id }),
          el("td", { text: engine.engine_type || "" }),
          el("td", {}, [badge]),
          el("td", {}, [el("time", { datetime: engine.last_heartbeat, text: ageOf(engine.last_heartbeat) })]),
          el("td", { text: engine.current_workload === undefined ? "" : engine.current_workload }),
        ]);
      }),
    );
    $("engines-empty").hidden = engines.length > 0;
  }

  function renderThroughput() {
    const now = Date.now();
    const newest = Math.floor(now / BUCKET_MS) * BUCKET_MS;
    const oldest = newest - (BUCKETS - 1) * BUCKET_MS;
    state.completions = state.completions.filter((at) => at >= oldest);
    const counts = new Array(BUCKETS).fill(0);
    for (const at of state.completions) counts[Math.min(BUCKETS - 1, Math.floor((at - oldest) / BUCKET_MS))] += 1;
    const total = counts.reduce((a, b) => a + b, 0);
    const top = Math.max(1, ...counts);
    $("throughput-total").textContent = String(total);

    const W = 600;
    const H = 150;
    const left = 28;
    const bottom = 18;
    const plotH = H - bottom - 6;
    const slot = (W - left) / BUCKETS;
    const NS = "http://www.w3.org/2000/svg";
    const svg = (tag, attrs, text) => {
      const node = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
      if (text !== undefined) node.textContent = text;
      return node;
    };
    const root = svg("svg", {
      viewBox: `0 0 ${W} ${H}`,
      role: "img",
      "aria-label": `${total} jobs completed in the last 10 minutes; at most ${top} in one 10 second interval`,
      preserveAspectRatio: "none",
    });
    root.append(
      svg("line", { x1: left, y1: 6, x2: W, y2: 6, class: "grid" }),
      svg("line", { x1: left, y1: 6 + plotH, x2: W, y2: 6 + plotH, class: "axis" }),
      svg("text", { x: left - 4, y: 12, class: "label", "text-anchor": "end" }, String(top)),
      svg("text", { x: left - 4, y: 6 + plotH, class: "label", "text-anchor": "end" }, "0"),
      svg("text", { x: left, y: H - 4, class: "label" }, "−10 min"),
      svg("text", { x: left + (W - left) / 2, y: H - 4, class: "label", "text-anchor": "middle" }, "−5 min"),
      svg("text", { x: W, y: H - 4, class: "label", "text-anchor": "end" }, "now"),
    );
    counts.forEach((count, i) => {
      const h = (count / top) * plotH;
      const start = new Date(oldest + i * BUCKET_MS).toLocaleTimeString([], { hour12: false });
      const bar = svg("rect", {
        x: (left + i * slot + 1).toFixed(1),
        y: (6 + plotH - h).toFixed(1),
        width: Math.max(1, slot - 2).toFixed(1),
        height: h.toFixed(1),
        class: "bar",
        "data-count": count,
      });
      bar.append(svg("title", {}, `${count} completed in the 10 s from ${start}`));
      root.append(bar);
    });
    $("throughput-chart").replaceChildren(root);
  }

  function addPipeline(name) {
    if (state.pipelines.has(name)) return;
    state.pipelines.add(name);
    const select = $("filter-pipeline");
    const names = Array.from(state.pipelines).sort();
    const keep = select.value;
    select.replaceChildren(el("option", { value: "", text: "All" }), ...names.map((n) => el("option", { value: n, text: n })));
    select.value = keep;
  }

  // --- Polling ------------------------------------------------------------------------

  function every(ms, task) {
    const run = async () => {
      try {
        await task();
      } catch (error) {
        if (!(error instanceof ApiError) || error.status >= 500) console.warn(error);
      }
      setTimeout(run, ms);
    };
    run();
  }

  async function pollHealth() {
    try {
      renderHealth((await api("GET", "/v1/health")).data);
    } catch (error) {
      // 503 (unhealthy) still carries the report.
      if (error instanceof ApiError && error.envelope && error.envelope.data) renderHealth(error.envelope.data);
      else throw error;
    }
  }

  async function pollMetrics() {
    renderMetrics((await api("GET", "/v1/metrics")).data);
  }

  async function pollEngines() {
    const reply = await api("GET", "/v1/engine-instances?limit=500");
    state.engines = new Map(reply.data.map((engine) => [String(engine.id), engine]));
    renderEngines();
  }

  async function pollFailures() {
    mergeListed((await api("GET", "/v1/jobs?status=failed&limit=50")).data);
  }

  async function loadPipelines() {
    for (const pipeline of (await api("GET", "/v1/pipelines")).data) addPipeline(pipeline.name);
  }

  async function loadFiltered() {
    const params = new URLSearchParams({ limit: "100" });
    if ($("filter-status").value) params.set("status", $("filter-status").value);
    if ($("filter-pipeline").value) params.set("pipeline", $("filter-pipeline").value);
    try {
      mergeListed((await api("GET", `/v1/jobs?${params}`)).data);
    } catch (error) {
      notice(`Could not load jobs: ${error.message}`, "error");
    }
  }

  // --- Wiring -------------------------------------------------------------------------

  function jobIdFor(node) {
    if (node.dataset.jobId) return node.dataset.jobId;
    const holder = node.closest("[data-job-id]");
    return holder ? holder.dataset.jobId : state.selected;
  }

  function start() {
    document.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button) {
        const id = jobIdFor(button);
        if (!id) return;
        if (button.dataset.action === "open") openDetail(id, true);
        else act(button.dataset.action, id, button);
        return;
      }
      const row = event.target.closest("#jobs-body tr[data-job-id]");
      if (row) openDetail(row.dataset.jobId, false);
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.selected) closeDetail();
    });
    $("detail-close").addEventListener("click", closeDetail);
    $("detail-title").setAttribute("tabindex", "-1");
    $("job-filters").addEventListener("submit", (event) => event.preventDefault());
    $("job-filters").addEventListener("change", () => {
      renderJobs();
      loadFiltered();
    });
    window.addEventListener("online", () => {
      events.reconnectNow();
      if (state.jobSocket) state.jobSocket.reconnectNow();
    });

    renderThroughput();
    renderJobs();
    events.open();
    loadPipelines().catch(() => undefined);
    every(POLL_MS, pollMetrics);
    every(POLL_MS, pollHealth);
    every(POLL_MS, pollEngines);
    every(FAILURES_POLL_MS, pollFailures);
    // Bars move on every 10 s; heartbeat ages tick every second.
    setInterval(renderThroughput, BUCKET_MS / 2);
    setInterval(() => {
      for (const tr of $("engines-body").children) {
        const time = tr.querySelector("time");
        if (time) time.textContent = ageOf(time.getAttribute("datetime"));
      }
    }, 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
