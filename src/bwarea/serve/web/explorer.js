// The BWArea action explorer: labels the prompt with inverse-dynamics actions, shows the next token under every
// action (fan-out), and streams generation with each token's action. Talks only to the server that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { timer: null, seq: 0, numActions: 64, controller: null, generated: "" };

// Neighbouring action numbers get far-apart hues (golden angle), so adjacent tokens are easy to tell apart.
function actionColour(action) {
  return `hsl(${((action * 137.508) % 360).toFixed(1)} 75% 82%)`;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// Spaces and newlines stay visible inside buttons, where a bare " the" would read as "the".
function visible(text) {
  return text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5");
}

async function api(path, body, signal) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || `${response.status} ${response.statusText}`);
  return data;
}

function tokenSpan(text, action, tip, extraClass = "") {
  const span = document.createElement("span");
  span.className = `tok ${extraClass}`.trim();
  span.textContent = text;
  if (action === null || action === undefined) {
    span.classList.add("none");
  } else {
    span.style.background = actionColour(action);
    span.dataset.action = String(action);
  }
  span.dataset.tip = tip;
  span.title = tip;
  return span;
}

function renderTokens(tokens) {
  const box = $("tokens");
  box.replaceChildren();
  for (const t of tokens) {
    const shown = t.text || t.token;  // a token that adds no text (BOS, a partial character) shows its vocabulary entry
    const tip = t.action === null ? `${t.token} (id ${t.id}): first token, no action`
      : `action ${t.action} · ${JSON.stringify(t.text)} (id ${t.id})`;
    box.appendChild(tokenSpan(shown, t.action, tip, t.text ? "" : "none"));
  }
}

function renderFanout(table) {
  const grid = $("fanout");
  grid.replaceChildren();
  const best = Math.max(...table.policy);
  for (const row of table.actions) {
    const cell = document.createElement("div");
    cell.className = "cell";
    cell.dataset.action = String(row.action);
    if (row.policy_prob === best) cell.classList.add("favourite");

    const head = document.createElement("div");
    head.className = "cell-head";
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.style.background = actionColour(row.action);
    badge.textContent = row.action;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.title = `policy: ${(100 * row.policy_prob).toFixed(1)}%`;
    const fill = document.createElement("div");
    fill.style.width = `${(100 * row.policy_prob / best).toFixed(1)}%`;
    bar.appendChild(fill);
    head.append(badge, bar);
    cell.appendChild(head);

    for (const t of row.top) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "choice";
      button.title = `append ${JSON.stringify(t.text)} (token ${t.id}, p=${t.prob.toFixed(3)} under action ${row.action})`;
      button.dataset.text = t.text;
      const label = document.createElement("span");
      label.className = "text";
      label.textContent = t.text ? visible(t.text) : t.token;
      const p = document.createElement("span");
      p.className = "p";
      p.textContent = t.prob.toFixed(2);
      button.append(label, p);
      button.addEventListener("click", () => appendToPrompt(t.text || ""));
      cell.appendChild(button);
    }
    grid.appendChild(cell);
  }
}

function appendToPrompt(text) {
  if (!text) return;
  $("prompt").value += text;
  update();
}

function refreshSoon() {
  clearTimeout(state.timer);
  state.timer = setTimeout(update, 250);
}

async function update() {
  clearTimeout(state.timer);
  const seq = ++state.seq;
  const prompt = $("prompt").value;
  setStatus("reading the prompt…");
  try {
    const [labels, fan] = await Promise.all([
      api("v1/actions", { prompt }),
      api("v1/fanout", { prompt, top_k: 3 }),
    ]);
    if (seq !== state.seq) return;  // a newer edit superseded this one
    renderTokens(labels.tokens);
    renderFanout(fan);
    // Which prompt the views show, so a reader (or a test) can tell fresh views from stale ones.
    $("tokens").dataset.prompt = prompt;
    $("fanout").dataset.prompt = prompt;
    setStatus(`${labels.tokens.length} tokens`);
  } catch (err) {
    if (seq === state.seq) setStatus(err.message, true);
  }
}

// Server-sent events from POST /v1/completions: "data: {json}\n\n" blocks, ending with "data: [DONE]".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function generate() {
  const prompt = $("prompt").value;
  const mode = $("action-mode").value;
  const body = {
    prompt,
    stream: true,
    return_actions: true,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    action_temperature: Number($("action-temperature").value),
  };
  if (mode !== "policy") body.actions = Number(mode);

  const out = $("output");
  out.replaceChildren(tokenSpan(prompt, null, "the prompt", "prompt"));
  out.dataset.state = "running";
  state.generated = "";
  state.controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("use-output").disabled = true;
  setStatus("generating…");
  let count = 0;
  try {
    const response = await fetch("v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || response.statusText);
    }
    let finish = null;
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      state.generated += choice.text;
      (choice.tokens || []).forEach((piece, i) => {
        const action = choice.actions[i];
        count += 1;
        out.appendChild(tokenSpan(piece || "\u00b7", action, `action ${action} · ${JSON.stringify(piece)} (id ${choice.token_ids[i]})`));
      });
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    setStatus(`generated ${count} tokens${finish ? ` (${finish})` : ""}`);
  } catch (err) {
    setStatus(err.name === "AbortError" ? `stopped after ${count} tokens` : err.message, err.name !== "AbortError");
  } finally {
    out.dataset.state = "done";
    state.controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
    $("use-output").disabled = state.generated.length === 0;
  }
}

async function init() {
  const select = $("action-mode");
  try {
    const models = await api("v1/models");
    const info = models.data[0];
    state.numActions = info.num_actions || 64;
    $("model").textContent = `${info.id} · ${state.numActions} actions · context ${info.max_model_len}`;
  } catch (err) {
    setStatus(err.message, true);
  }
  for (let a = 0; a < state.numActions; a++) {
    const option = document.createElement("option");
    option.value = String(a);
    option.textContent = `always action ${a}`;
    select.appendChild(option);
  }
  $("prompt").addEventListener("input", refreshSoon);
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("use-output").addEventListener("click", () => appendToPrompt(state.generated));
  update();
}

init();
