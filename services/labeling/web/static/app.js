// The labeling page of `hitl label-web`: sign in, judge leased tasks with buttons or keys.
//
// How one signs in is the server's choice (GET /api/me says it in "auth"): "tokens" asks
// for the annotator's personal token, "open" (loopback only) for an annotator id, and
// "header" asks nothing (a sign-in proxy in front says who it is). The session cookie is
// HttpOnly: this script never sees it, and never keeps the token.
//
// Every judgement gets its feedback_id here, once, when it is made, and goes into an
// outbox in localStorage before it is posted. The outbox is sent in order; an item
// leaves it only when the server answers (stored, or refused for good with a 4xx).
// After a failure (network, 5xx) the same body is resent, so the service stores it
// once (it answers "duplicate" for what it already has). A page reload sends what is
// left before showing a task. While something is unsent, no new judgement is taken:
// the page never shows a task whose judgement is still on its way.
"use strict";

const state = {
  me: null,          // {annotator_id, auth, project, guidelines, guidelines_version}
  task: null,        // the task on screen (as /api/task sends it)
  shownAt: 0,        // performance.now() when the task was shown
  choosing: null,    // {what: "correct" | "flag"} while waiting for a candidate key
  flagTarget: null,  // {candidate_id, label} of an open flag panel ("" is the prompt)
  correctionTarget: null,
  sending: null,     // the running flush (a Promise) or null
  offline: false,
  pollTimer: null,
};

const $ = (id) => document.getElementById(id);

// -- small helpers -------------------------------------------------------------

function say(text, kind = "") {
  const el = $("message");
  el.textContent = text;
  el.className = kind;
}

function newFeedbackId() {
  // a UUID v4 from getRandomValues (crypto.randomUUID needs a secure context)
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function blurFocus() {
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  return { status: response.status, data };
}

// -- the outbox ------------------------------------------------------------------

const outbox = {
  key() { return `hitl-label-web:outbox:${state.me.annotator_id}`; },
  items() {
    try { return JSON.parse(localStorage.getItem(this.key()) || "[]"); } catch (_) { return []; }
  },
  save(items) { localStorage.setItem(this.key(), JSON.stringify(items)); },
  add(item) { const items = this.items(); items.push(item); this.save(items); },
  drop(feedbackId) { this.save(this.items().filter((i) => i.body.feedback_id !== feedbackId)); },
};

function showConnection() {
  const n = outbox.items().length;
  $("unsent").textContent = String(n);
  const el = $("connection");
  el.textContent = state.offline ? "○ offline, retrying" : "● online";
  el.className = state.offline ? "bad" : "ok";
}

// Send the outbox in order until it is empty. Returns false if an item was refused.
function flush() {
  if (!state.sending) {
    state.sending = sendAll().finally(() => { state.sending = null; });
  }
  return state.sending;
}

async function sendAll() {
  let delay = 300;
  let allStored = true;
  for (;;) {
    const [item] = outbox.items();
    showConnection();
    if (!item) return allStored;
    let answer;
    try {
      answer = await api("POST", "/api/judgements", item.body);
    } catch (err) {
      answer = { status: 0, data: { error: String(err) } };
    }
    if (answer.status === 200) {
      outbox.drop(item.body.feedback_id);
      state.offline = false;
      delay = 300;
      const again = answer.data && answer.data.status === "duplicate" ? " (it was stored before)" : "";
      say(`saved: ${item.summary} (${item.body.task_id})${again}`, "ok");
    } else if (answer.status === 401) {
      showSignin("Signed out: sign in again to send your unsent judgements.");
      return false;
    } else if (answer.status >= 400 && answer.status < 500) {
      outbox.drop(item.body.feedback_id);
      allStored = false;
      const why = answer.data && answer.data.error ? answer.data.error : `HTTP ${answer.status}`;
      say(`not saved: ${item.summary}: ${why}`, "bad");
    } else {
      state.offline = true;
      showConnection();
      say(`the server did not store "${item.summary}" yet; retrying with the same id…`, "warn");
      await sleep(delay);
      delay = Math.min(5000, delay * 2);
    }
  }
}

// -- signing in --------------------------------------------------------------------

// The sign-in form of the server's mode: a token field, an id field, or (header) no form.
function showSignin(error = "") {
  const mode = state.me.auth;
  $("work").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  $("signin-form").hidden = mode === "header";
  $("signin-proxy").hidden = mode !== "header";
  $("signin-token-row").hidden = mode !== "tokens";
  $("signin-id-row").hidden = mode !== "open";
  $("token").required = mode === "tokens";
  $("annotator-id").required = mode === "open";
  $("signin-error").textContent = error;
  if (mode === "tokens") $("token").focus();
  else if (mode === "open") $("annotator-id").focus();
}

async function signIn(event) {
  event.preventDefault();
  const body = state.me.auth === "tokens"
    ? { token: $("token").value.trim() }
    : { annotator_id: $("annotator-id").value.trim() };
  const answer = await api("POST", "/api/signin", body);
  $("token").value = "";  // the token is not kept in the page, whatever the answer
  if (answer.status !== 200) {
    $("signin-error").textContent = answer.data ? answer.data.error : `HTTP ${answer.status}`;
    return;
  }
  state.me.annotator_id = answer.data.annotator_id;
  await startWork();
}

async function signOut() {
  const unsent = outbox.items().length;
  if (unsent && !confirm(`${unsent} judgement(s) are not sent yet; they stay in this browser. Sign out?`)) return;
  await api("POST", "/api/signout");
  state.me.annotator_id = null;
  state.task = null;
  showSignin();
}

async function startWork() {
  $("signin").hidden = true;
  $("who").hidden = false;
  $("annotator").textContent = state.me.annotator_id;
  $("signout").hidden = state.me.auth === "header";  // the proxy keeps that session
  $("work").hidden = false;
  blurFocus();
  await flush();  // what an earlier page left unsent goes first
  await loadTask();
  refreshStats();
}

// -- tasks --------------------------------------------------------------------------

async function loadTask() {
  clearTimeout(state.pollTimer);
  closePanels();
  let answer;
  try {
    answer = await api("GET", "/api/task");
  } catch (err) {
    answer = { status: 0, data: { error: String(err) } };
  }
  if (answer.status === 401) { showSignin(); return; }
  if (answer.status !== 200) {
    state.offline = true;
    showConnection();
    say(`cannot fetch a task: ${answer.data ? answer.data.error : answer.status}; trying again…`, "warn");
    state.pollTimer = setTimeout(loadTask, 2000);
    return;
  }
  state.offline = false;
  showConnection();
  const task = answer.data.task;
  if (!task) {
    state.task = null;
    $("task").hidden = true;
    $("empty").hidden = false;
    state.pollTimer = setTimeout(loadTask, 3000);
    return;
  }
  if (!state.task || state.task.task_id !== task.task_id) showTask(task);
}

function showTask(task) {
  state.task = task;
  blurFocus();  // a button focused by a click must not be pressed again by Enter
  $("empty").hidden = true;
  $("task").hidden = false;
  $("task-id").textContent = task.task_id;
  $("prompt").textContent = task.prompt;
  const box = $("candidates");
  box.replaceChildren(...task.candidates.map(candidateCard));
  box.classList.toggle("two", task.candidates.length === 2);
  $("preference-actions").hidden = task.candidates.length !== 2;
  $("ranking-form").hidden = task.candidates.length === 2;
  $("ranking").value = "";
  buildRatings(task);
  document.querySelector('input[name="confidence"][value=""]').checked = true;
  showLease();
  state.shownAt = performance.now();
}

function candidateCard(c) {
  const card = document.createElement("article");
  card.className = "candidate";
  card.dataset.candidateId = c.candidate_id;
  const head = document.createElement("h3");
  head.textContent = `${c.label} · policy v${c.policy_version}`;
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = c.text;
  const actions = document.createElement("div");
  actions.className = "card-actions";
  const edit = document.createElement("button");
  edit.type = "button";
  edit.textContent = `Correct ${c.label}`;
  edit.addEventListener("click", () => openCorrection(c));
  const flag = document.createElement("button");
  flag.type = "button";
  flag.textContent = `Flag ${c.label}`;
  flag.addEventListener("click", () => openFlag(c));
  actions.append(edit, flag);
  card.append(head, text, actions);
  return card;
}

function showLease() {
  if (!state.task) return;
  const left = Math.round(state.task.lease_expires_at - Date.now() / 1000);
  $("lease").textContent = left > 0 ? `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")} left` : "expired";
}

async function refreshStats() {
  if (!state.me || !state.me.annotator_id) return;
  let answer;
  try {
    answer = await api("GET", "/api/stats");
  } catch (_) {
    return;  // shown as offline by the next send or fetch
  }
  if (answer.status !== 200) return;
  const known = (n) => (n === null || n === undefined ? "–" : String(n));
  $("judged").textContent = known(answer.data.session.judged);
  $("skipped").textContent = known(answer.data.session.skipped);
  $("server-records").textContent = known(answer.data.server_records);
  $("open-tasks").textContent = known(answer.data.open_tasks);
}

// -- judgements ------------------------------------------------------------------------

function busy() {
  if (state.sending || outbox.items().length) {
    say("still sending the last judgement; wait a moment", "warn");
    return true;
  }
  return false;
}

function confidence() {
  const picked = document.querySelector('input[name="confidence"]:checked');
  return picked && picked.value ? Number(picked.value) / 5 : null;
}

async function judge(kind, payload, summary, finishes) {
  const task = state.task;
  if (!task || busy()) return;
  const body = {
    feedback_id: newFeedbackId(),
    task_id: task.task_id,
    prompt_id: task.prompt_id,
    display_order: task.candidates.map((c) => c.candidate_id),
    lead_time_seconds: Math.round(performance.now() - state.shownAt) / 1000,
    client_time: new Date().toISOString(),
    guidelines_version: state.me.guidelines_version,
    [kind]: payload,
  };
  const conf = finishes ? confidence() : null;
  if (conf !== null) body.confidence = conf;
  outbox.add({ body, summary, finishes });
  say(`saving: ${summary}…`);
  closePanels();
  const stored = await flush();
  refreshStats();
  if (stored && finishes && state.task === task) {
    state.task = null;
    await loadTask();
  }
}

const PREFERENCES = {
  a: ["A", 0.5, "A better"],
  A: ["A", 1.0, "A clearly better"],
  b: ["B", 0.5, "B better"],
  B: ["B", 1.0, "B clearly better"],
  t: ["tie", null, "tie"],
  x: ["both_bad", null, "both bad"],
};

function prefer(key) {
  const task = state.task;
  if (!task) return;
  if (task.candidates.length !== 2) {
    say(`this task has ${task.candidates.length} answers: rank them (digits, best first, then Enter)`, "warn");
    return;
  }
  const [choice, strength, summary] = PREFERENCES[key];
  const [left, right] = task.candidates;
  const payload = { candidate_a_id: left.candidate_id, candidate_b_id: right.candidate_id, choice };
  if (strength !== null) payload.strength = strength;
  judge("preference", payload, summary, true);
}

// "312" -> [[3], [1], [2]]; "3=12" ties 3 and 1; the last candidate may be left out.
function parseRanking(text, k) {
  const compact = text.trim();
  const tokens = k > 9 || /[\s,]/.test(compact) ? compact.match(/\d+|=|[^\d\s,=]/g) || [] : Array.from(compact);
  const groups = [];
  const seen = new Set();
  let tie = false;
  for (const tok of tokens) {
    if (tok === "=") { tie = true; continue; }
    if (!/^\d+$/.test(tok)) throw new Error(`"${tok}" is not an answer number`);
    const n = Number(tok);
    if (n < 1 || n > k) throw new Error(`${n} is not an answer (1-${k})`);
    if (seen.has(n)) throw new Error(`${n} appears twice`);
    seen.add(n);
    if (tie && groups.length) groups[groups.length - 1].push(n); else groups.push([n]);
    tie = false;
  }
  const missing = [];
  for (let n = 1; n <= k; n++) if (!seen.has(n)) missing.push(n);
  if (missing.length === 1 && seen.size) groups.push(missing);
  else if (missing.length) throw new Error(`rank every answer; missing ${missing.join(", ")}`);
  return groups;
}

function saveRanking(event) {
  event.preventDefault();
  const task = state.task;
  if (!task) return;
  let groups;
  try {
    groups = parseRanking($("ranking").value, task.candidates.length);
  } catch (err) {
    say(err.message, "warn");
    return;
  }
  const entries = [];
  let done = 0;
  for (const group of groups) {
    for (const n of group) entries.push({ candidate_id: task.candidates[n - 1].candidate_id, rank: done + 1 });
    done += group.length;
  }
  const summary = "ranking " + groups.map((g) => g.map((n) => task.candidates[n - 1].label).join("=")).join(" > ");
  $("ranking").blur();
  judge("ranking", { entries }, summary, true);
}

function buildRatings(task) {
  const form = $("ratings-form");
  const table = $("ratings-table");
  form.hidden = task.rating_scales.length === 0;
  const head = document.createElement("tr");
  head.append(document.createElement("th"));
  for (const s of task.rating_scales) {
    const th = document.createElement("th");
    th.textContent = `${s.aspect} (${s.min}–${s.max})`;
    head.append(th);
  }
  const rows = task.candidates.map((c) => {
    const tr = document.createElement("tr");
    const label = document.createElement("th");
    label.textContent = c.label;
    tr.append(label);
    for (const s of task.rating_scales) {
      const td = document.createElement("td");
      const input = document.createElement("input");
      input.type = "number";
      input.step = "any";
      input.min = String(s.min);
      input.max = String(s.max);
      input.dataset.candidateId = c.candidate_id;
      input.dataset.aspect = s.aspect;
      input.setAttribute("aria-label", `${s.aspect} of ${c.label}`);
      td.append(input);
      tr.append(td);
    }
    return tr;
  });
  table.replaceChildren(head, ...rows);
}

function saveRatings(event) {
  event.preventDefault();
  const task = state.task;
  if (!task) return;
  const entries = [];
  for (const c of task.candidates) {
    const inputs = Array.from(document.querySelectorAll(`#ratings-table input`)).filter((i) => i.dataset.candidateId === c.candidate_id);
    const filled = inputs.filter((i) => i.value.trim() !== "");
    if (!filled.length) continue;
    if (filled.length !== inputs.length) { say(`rate ${c.label} on every aspect, or on none`, "warn"); return; }
    for (const input of inputs) {
      const scale = task.rating_scales.find((s) => s.aspect === input.dataset.aspect);
      const value = Number(input.value);
      if (!Number.isFinite(value) || value < scale.min || value > scale.max) {
        say(`${scale.aspect} of ${c.label} must lie in ${scale.min}-${scale.max}`, "warn");
        input.focus();
        return;
      }
      entries.push({ candidate_id: c.candidate_id, aspect: scale.aspect, value });
    }
  }
  if (!entries.length) { say("no ratings given; nothing saved", "warn"); return; }
  blurFocus();
  judge("ratings", { entries }, `ratings (${entries.length} values)`, true);
}

// -- corrections and flags -----------------------------------------------------------------

function closePanels() {
  $("correction-panel").hidden = true;
  $("flag-panel").hidden = true;
  state.choosing = null;
  state.flagTarget = null;
  state.correctionTarget = null;
}

function openCorrection(c) {
  if (busy()) return;
  closePanels();
  state.correctionTarget = c;
  $("correction-target").textContent = c.label;
  $("correction-text").value = c.text;
  $("correction-note").value = "";
  $("correction-panel").hidden = false;
  $("correction-text").focus();
  say(`correcting ${c.label}: edit the text, Ctrl+Enter saves, Esc cancels`);
}

function saveCorrection(event) {
  event.preventDefault();
  const c = state.correctionTarget;
  if (!c) return;
  const text = $("correction-text").value;
  if (text.trim() === c.text.trim()) { say("correction not saved: the text is unchanged", "warn"); return; }
  const payload = { candidate_id: c.candidate_id, corrected_text: text, note: $("correction-note").value.trim() };
  blurFocus();
  judge("correction", payload, `correction of ${c.label}`, false);
}

function openFlag(c) {
  if (busy()) return;
  closePanels();
  state.flagTarget = c || { candidate_id: "", label: "the prompt" };
  $("flag-target").textContent = state.flagTarget.label === "the prompt" ? "the prompt" : state.flagTarget.label;
  for (const r of document.querySelectorAll('input[name="flag-kind"]')) r.checked = false;
  $("flag-note").value = "";
  $("flag-panel").hidden = false;
  say("flag as: h harmful · p PII · s spam · o other; Enter saves, Esc cancels");
}

function pickFlagKind(kind) {
  const radio = document.querySelector(`input[name="flag-kind"][value="${kind}"]`);
  radio.checked = true;
  $("flag-note").focus();
}

function saveFlag(event) {
  event.preventDefault();
  const target = state.flagTarget;
  if (!target) return;
  const picked = document.querySelector('input[name="flag-kind"]:checked');
  if (!picked) { say("choose a kind: h harmful, p PII, s spam, o other", "warn"); return; }
  const note = $("flag-note").value.trim();
  if (picked.value === "other" && !note) { say("a flag of kind 'other' needs a note", "warn"); $("flag-note").focus(); return; }
  blurFocus();
  judge("flag", { candidate_id: target.candidate_id, kind: picked.value, note }, `flag ${picked.value} on ${target.label}`, false);
}

function startChoosing(what) {
  const task = state.task;
  if (!task || busy()) return;
  closePanels();
  state.choosing = what;
  const names = task.candidates.map((c) => c.label).join("/");
  say(what === "correct" ? `correct which answer? ${names} (Esc cancels)` : `flag what? ${names}, or p the prompt (Esc cancels)`);
}

function choose(key) {
  const what = state.choosing;
  state.choosing = null;
  const task = state.task;
  if (what === "flag" && key === "p") { openFlag(null); return; }
  const c = task.candidates.find((x) => x.label.toLowerCase() === key.toLowerCase());
  if (!c) { say("cancelled", ""); return; }
  if (what === "correct") openCorrection(c); else openFlag(c);
}

async function skip() {
  const task = state.task;
  if (!task || busy()) return;
  const answer = await api("POST", "/api/skip", { task_id: task.task_id });
  if (answer.status !== 200) { say(`cannot skip: ${answer.data ? answer.data.error : answer.status}`, "bad"); return; }
  say(`skipped ${task.task_id}`);
  refreshStats();
  state.task = null;
  await loadTask();
}

// -- keys ------------------------------------------------------------------------------------

function toggleHelp(show) {
  const help = $("help");
  if (show) help.replaceChildren($("keys").cloneNode(true));
  help.hidden = !show;
}

function onKey(event) {
  if (!state.me || !state.me.annotator_id || $("work").hidden) return;
  const target = event.target;
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && target === $("correction-text")) {
    event.preventDefault();
    $("correction-panel").requestSubmit();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "Escape") {
    toggleHelp(false);
    if (state.choosing || !$("correction-panel").hidden || !$("flag-panel").hidden) say("cancelled");
    closePanels();
    if (target.blur) target.blur();
    return;
  }
  const typing = target.matches && target.matches("input:not([type=radio]), textarea");
  if (typing) return;  // text fields keep their keys; their forms save on Enter
  if (!$("help").hidden) { toggleHelp(false); event.preventDefault(); return; }
  if (state.choosing) { event.preventDefault(); choose(event.key); return; }
  if (!$("flag-panel").hidden) {
    const kinds = { h: "harmful", p: "pii", s: "spam", o: "other" };
    if (kinds[event.key]) { event.preventDefault(); pickFlagKind(kinds[event.key]); }
    else if (event.key === "Enter") { event.preventDefault(); $("flag-panel").requestSubmit(); }
    return;
  }
  if (handleKey(event.key)) event.preventDefault();
}

function handleKey(key) {
  if (key === "?") { toggleHelp(true); return true; }
  if (!state.task) return false;
  if (key in PREFERENCES) { prefer(key); return true; }
  if (/^[1-9=]$/.test(key) && state.task.candidates.length > 2) {
    const input = $("ranking");
    input.value += key;
    input.focus();
    return true;
  }
  if (key === "r") {
    const first = document.querySelector("#ratings-table input");
    if (first && !$("ratings-form").hidden) first.focus(); else say("this task declares no rating scales", "warn");
    return true;
  }
  if (key === "e") { startChoosing("correct"); return true; }
  if (key === "f") { startChoosing("flag"); return true; }
  if (key === "s") { skip(); return true; }
  return false;
}

// -- start -------------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  for (const button of document.querySelectorAll("#preference-actions button")) {
    button.addEventListener("click", () => { button.blur(); prefer(button.dataset.key); });
  }
  $("ranking-form").addEventListener("submit", saveRanking);
  $("ratings-form").addEventListener("submit", saveRatings);
  $("correction-panel").addEventListener("submit", saveCorrection);
  $("flag-panel").addEventListener("submit", saveFlag);
  for (const cancel of document.querySelectorAll(".panel .cancel")) {
    cancel.addEventListener("click", () => { closePanels(); say("cancelled"); });
  }
  $("correct").addEventListener("click", () => { $("correct").blur(); startChoosing("correct"); });
  $("flag").addEventListener("click", () => { $("flag").blur(); startChoosing("flag"); });
  $("skip").addEventListener("click", () => { $("skip").blur(); skip(); });
  document.addEventListener("keydown", onKey);
  setInterval(showLease, 1000);
  setInterval(refreshStats, 10000);
}

async function boot() {
  wire();
  const answer = await api("GET", "/api/me");
  state.me = answer.data;
  $("project").textContent = state.me.project;
  $("guidelines").textContent = state.me.guidelines || "(no guidelines given)";
  $("guidelines-version").textContent = state.me.guidelines_version;
  if (state.me.annotator_id) await startWork(); else showSignin();
}

document.addEventListener("DOMContentLoaded", boot);
