// The BWArea action explorer: labels the prompt with inverse-dynamics actions, shows the next token under every
// action (fan-out), streams generation with each token's action, and shows a search over actions beside the
// policy's greedy completion. Talks only to the server that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { timer: null, seq: 0, numActions: 64, controller: null, generated: "", searchRewards: [] };

// Each action gets its own colour, as far from every other action's as the page can make it: candidates span
// hues, two saturations and eight lightness levels; action 0 takes the first, and each next action the
// candidate farthest (in CIELAB, i.e. as the eye sees it) from all colours taken so far. 64 actions end up
// at least 20 Delta-E apart (golden-angle hues at one lightness leave a pair 1 apart), and low action
// numbers, used most, are the most distinct. Candidates too mid-grey for black or white text to read on
// (contrast under 4.5) are left out; the text takes whichever of the two contrasts more.
const palette = { colours: [], candidates: null, distance: null };

function actionColour(action) {
  if (!palette.candidates) {
    palette.candidates = [];
    for (let hue = 0; hue < 360; hue += 5) {
      for (const saturation of [0.5, 0.9]) {
        for (const lightness of [0.88, 0.8, 0.72, 0.64, 0.56, 0.48, 0.4, 0.32]) {
          const rgb = hslToRgb(hue, saturation, lightness);
          const y = relativeLuminance(rgb);
          const onBlack = (y + 0.05) / 0.05, onWhite = 1.05 / (y + 0.05);
          if (Math.max(onBlack, onWhite) >= 4.5) {
            palette.candidates.push({ rgb, lab: cielab(rgb), text: onBlack >= onWhite ? "#000" : "#fff" });
          }
        }
      }
    }
    palette.distance = palette.candidates.map(() => Infinity);
  }
  while (palette.colours.length <= action) {  // farthest-point order: extending never changes earlier colours
    let best = 0;
    if (palette.colours.length) {
      palette.distance.forEach((d, i) => { if (d > palette.distance[best]) best = i; });
    }
    const chosen = palette.candidates[best];
    palette.candidates.forEach((c, i) => {
      palette.distance[i] = Math.min(palette.distance[i], Math.hypot(...c.lab.map((v, k) => v - chosen.lab[k])));
    });
    palette.colours.push({ background: `rgb(${chosen.rgb.join(", ")})`, text: chosen.text });
  }
  return palette.colours[action];
}

function hslToRgb(hue, saturation, lightness) {
  const a = saturation * Math.min(lightness, 1 - lightness);
  const channel = (n) => {
    const k = (n + hue / 30) % 12;
    return Math.round(255 * (lightness - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [channel(0), channel(8), channel(4)];
}

function linearRgb(rgb) {
  return rgb.map((c) => (c / 255 <= 0.04045 ? c / 255 / 12.92 : ((c / 255 + 0.055) / 1.055) ** 2.4));
}

function relativeLuminance(rgb) {
  const [r, g, b] = linearRgb(rgb);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}

function cielab(rgb) {  // sRGB -> CIELAB (D65)
  const [r, g, b] = linearRgb(rgb);
  const f = (t) => (t > 216 / 24389 ? Math.cbrt(t) : (24389 / 27 * t + 16) / 116);
  const x = f((0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047);
  const y = f(0.2126 * r + 0.7152 * g + 0.0722 * b);
  const z = f((0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883);
  return [116 * y - 16, 500 * (x - y), 200 * (y - z)];
}

function paintAction(element, action) {
  const colour = actionColour(action);
  element.style.background = colour.background;
  element.style.color = colour.text;
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
    paintAction(span, action);
    span.dataset.action = String(action);  // style.css shows it after the token
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
    paintAction(badge, row.action);
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

// ----- search: the searched completion under the policy's greedy one ------------------------------------------
function renderCompletion(box, prompt, choice, diverged) {
  box.replaceChildren(tokenSpan(prompt, null, "the prompt", "prompt"));
  choice.tokens.forEach((piece, i) => {
    const action = choice.actions[i];
    const tip = `action ${action} · ${JSON.stringify(piece)} (id ${choice.token_ids[i]})`;
    box.appendChild(tokenSpan(piece || "\u00b7", action, tip, i >= diverged ? "diverged" : ""));
  });
}

function formatReward(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(3);
}

async function runSearch() {
  const prompt = $("prompt").value;
  const maxTokens = Number($("search-tokens").value);
  const search = {
    method: $("search-method").value,
    budget: Number($("search-budget").value),
    reward: $("search-reward").value,
  };
  const box = $("search-result");
  box.dataset.state = "running";
  $("search").disabled = true;
  setStatus(`searching (${search.method}, budget ${search.budget})…`);
  try {
    // Both go through /v1/completions and run on the server's worker in turn. The greedy completion (temperature
    // 0: argmax actions and tokens) is the sequence every search scores first, so its reward comes with the search.
    const [found, greedy] = await Promise.all([
      api("v1/completions", { prompt, max_tokens: maxTokens, seed: Number($("search-seed").value),
                              return_actions: true, search }),
      api("v1/completions", { prompt, max_tokens: maxTokens, temperature: 0, return_actions: true }),
    ]);
    const g = greedy.choices[0], s = found.choices[0], info = found.search;
    let diverged = 0;  // tokens from the first step where the search left the greedy path are underlined
    while (diverged < Math.min(s.token_ids.length, g.token_ids.length)
           && s.token_ids[diverged] === g.token_ids[diverged] && s.actions[diverged] === g.actions[diverged]) {
      diverged += 1;
    }
    renderCompletion($("greedy-output"), prompt, g, Infinity);
    renderCompletion($("search-output"), prompt, s, diverged);
    $("greedy-reward").textContent = g.text === info.greedy.text ? `reward ${formatReward(info.greedy.reward)}`
      : "(not the search's greedy sequence: reward unknown)";
    $("search-label").textContent = `search (${info.method})`;
    $("search-reward-value").textContent = `reward ${formatReward(info.reward)}`;
    const st = info.stats;
    $("search-stats").textContent = `${st.evaluations} of ${st.budget} world-model token evaluations · ${st.nodes} `
      + `nodes · ${st.rounds} rounds · ${st.sequences} sequences scored · ${st.seconds.toFixed(2)} s`;
    box.dataset.state = "done";
    setStatus(`searched: reward ${formatReward(info.reward)} (greedy ${formatReward(info.greedy.reward)})`);
  } catch (err) {
    box.dataset.state = "error";
    setStatus(err.message, true);
  } finally {
    $("search").disabled = state.searchRewards.length === 0;
  }
}

function setUpSearch(limits) {
  const select = $("search-reward");
  state.searchRewards = (limits && limits.rewards) || [];
  for (const name of state.searchRewards) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.appendChild(option);
  }
  if (!state.searchRewards.length) {
    const option = document.createElement("option");
    option.textContent = "none: start the server with --search-reward";
    select.appendChild(option);
    select.disabled = true;
    $("search").disabled = true;
    return;
  }
  $("search-budget").max = limits.max_budget;
  $("search-budget").value = Math.min(Number($("search-budget").value), limits.max_budget);
  $("search-tokens").max = limits.max_tokens;
  $("search-tokens").value = Math.min(Number($("search-tokens").value), limits.max_tokens);
}

async function init() {
  const select = $("action-mode");
  let searchLimits = null;
  try {
    const models = await api("v1/models");
    const info = models.data[0];
    state.numActions = info.num_actions || 64;
    // Start from the model's own action temperature: what a request without one gets.
    if (typeof info.action_temperature === "number") $("action-temperature").value = info.action_temperature;
    $("model").textContent = `${info.id} · ${state.numActions} actions · context ${info.max_model_len}`;
    searchLimits = info.search;
  } catch (err) {
    setStatus(err.message, true);
  }
  setUpSearch(searchLimits);
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
  $("search").addEventListener("click", runSearch);
  update();
}

init();
