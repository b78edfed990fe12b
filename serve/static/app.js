// The page at `/`: streams a completion from /v1/completions (server-sent events) into the page as it is written.
// Plain browser JavaScript, served by the server itself: no CDN, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// Yields the JSON payload of each `data:` event of a server-sent-event response body, until `[DONE]`.
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function complete(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  const body = {
    prompt,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    ignore_eos: $("ignore-eos").checked,
    stream: true,
    logprobs: 0, // each chunk then lists its tokens: the rate counts tokens, not chunks
  };
  $("shown-prompt").textContent = prompt;
  $("output").textContent = "";
  $("rate").textContent = "";
  $("start").disabled = true;
  $("stop").disabled = false;
  setStatus("waiting for the first token");
  controller = new AbortController();
  let tokens = 0;
  let first = null;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const answer = await response.json().catch(() => ({}));
      throw new Error(answer.error ? answer.error.message : `HTTP ${response.status}`);
    }
    let reason = null;
    for await (const chunk of events(response.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        $("output").textContent += choice.text;
        tokens += choice.logprobs ? choice.logprobs.tokens.length : 0;
        if (choice.finish_reason) reason = choice.finish_reason;
      }
      const now = performance.now();
      if (first === null) first = now;
      setStatus("writing");
      // the rate of the stream after its first chunk (the first token's wait is the prompt's prefill)
      if (now > first && tokens > 1) $("rate").textContent = `${((tokens - 1) / ((now - first) / 1000)).toFixed(1)} tokens/s`;
    }
    setStatus(`done (${reason === "length" ? "length reached" : "end of story"}), ${tokens} tokens`);
  } catch (err) {
    if (err.name === "AbortError") setStatus(`stopped, ${tokens} tokens`);
    else setStatus(`error: ${err.message}`, true);
  } finally {
    controller = null;
    $("start").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (controller) controller.abort(); // closes the connection: the server frees the sequence's slot at once
}

async function showModel() {
  try {
    const health = await (await fetch("/health")).json();
    $("model").textContent = health.model;
  } catch (err) {
    setStatus("the server does not answer", true);
  }
}

$("form").addEventListener("submit", complete);
$("stop").addEventListener("click", stop);
showModel();
