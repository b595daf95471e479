// A small OpenAI-compatible server around node-llama-cpp (prebuilt llama.cpp
// binaries from npm), so that the real-model test needs no compiler: the
// model runs in llama.cpp itself, only the HTTP layer is ours.
//
//   node server.mjs --model M.gguf --port P [--alias smollm2] [--threads 2]
//
// Serves GET /v1/models and POST /v1/chat/completions (JSON or, with
// "stream": true, server-sent chat.completion.chunk events ending in
// "data: [DONE]", usage last when stream_options.include_usage is set), as
// OpenAI documents them. One generation at a time: later requests wait their
// turn (vLLM would batch them; a 2-core CPU gains nothing from that).
import http from "node:http";
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import { getLlama, LlamaChatSession } from "node-llama-cpp";

const { values: args } = parseArgs({
  options: {
    model: { type: "string" },
    port: { type: "string", default: "8089" },
    alias: { type: "string", default: "smollm2" },
    threads: { type: "string", default: "2" },
  },
});
const alias = args.alias;
const port = Number(args.port);

// build: "never" keeps it on the prebuilt binaries: a missing one is an
// error here, not a 15-minute compile.
const llama = await getLlama({ gpu: false, build: "never" });
const model = await llama.loadModel({ modelPath: args.model });
const context = await model.createContext({
  contextSize: 2048,
  threads: Number(args.threads),
});
const sequence = context.getSequence();

class BadRequest extends Error {
  constructor(param, message, { status = 400, code = null } = {}) {
    super(message);
    Object.assign(this, { param, status, code });
  }
}

function text(content, i) {
  if (typeof content === "string") return content;
  if (Array.isArray(content))
    return content
      .filter((p) => p?.type === "text")
      .map((p) => p.text)
      .join("");
  throw new BadRequest(`messages[${i}].content`, "content must be a string or an array of parts");
}

// OpenAI's messages as node-llama-cpp's chat history, the last user message
// apart: it is what the session is prompted with.
function parse(body) {
  if (typeof body !== "object" || body === null || Array.isArray(body))
    throw new BadRequest(null, "the body must be a JSON object");
  if (body.model !== alias)
    throw new BadRequest("model", `The model '${body.model}' does not exist`, {
      status: 404,
      code: "model_not_found",
    });
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0)
    throw new BadRequest("messages", "messages must be a non-empty array");
  const history = messages.slice(0, -1).map((m, i) => {
    const t = text(m?.content, i);
    switch (m?.role) {
      case "system":
      case "developer":
        return { type: "system", text: t };
      case "user":
        return { type: "user", text: t };
      case "assistant":
        return { type: "model", response: [t] };
      default:
        throw new BadRequest(`messages[${i}].role`, `unsupported role '${m?.role}'`);
    }
  });
  const last = messages[messages.length - 1];
  if (last?.role !== "user")
    throw new BadRequest(`messages[${messages.length - 1}].role`, "the last message must be the user's");
  // OpenAI now prefers max_completion_tokens; self-hosted servers take max_tokens.
  const maxField = body.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens";
  const maxTokens = body[maxField] ?? undefined;
  if (maxTokens !== undefined && !(Number.isInteger(maxTokens) && maxTokens > 0))
    throw new BadRequest(maxField, `${maxField} must be a positive integer`);
  const stop = body.stop === undefined || body.stop === null ? [] : [body.stop].flat();
  return {
    history,
    prompt: text(last.content, messages.length - 1),
    options: {
      maxTokens,
      temperature: body.temperature ?? 1,
      topP: body.top_p,
      seed: body.seed,
      customStopTriggers: stop.length ? stop : undefined,
    },
    stream: body.stream === true,
    includeUsage: body.stream_options?.include_usage === true,
  };
}

// One generation at a time, in arrival order.
let turn = Promise.resolve();
function exclusive(job) {
  const run = turn.then(job, job);
  turn = run.catch(() => {});
  return run;
}

async function generate(req, onText, signal) {
  await sequence.clearHistory();
  const session = new LlamaChatSession({ contextSequence: sequence, autoDisposeSequence: false });
  session.setChatHistory(req.history);
  // The prompt as the chat template renders it, counted in tokens: the
  // token meter counts the prompt's last token as output (it is evaluated
  // for the first sample's logits), so it is not the prompt's length.
  const rendered = session.chatWrapper.generateContextState({
    chatHistory: [...req.history, { type: "user", text: req.prompt }, { type: "model", response: [] }],
  }).contextText;
  const promptTokens = rendered.tokenize(model.tokenizer).length;
  const before = sequence.tokenMeter.getState();
  try {
    const out = await session.promptWithMeta(req.prompt, {
      ...req.options,
      onTextChunk: onText,
      signal,
      stopOnAbortSignal: true,
    });
    const used = sequence.tokenMeter.diff(before);
    // Every token evaluated is the prompt's or a sampled one fed back, and
    // the last sampled is never fed back: sampled = evaluated - prompt + 1
    // (an end-of-turn token included).
    const completionTokens = used.usedInputTokens + used.usedOutputTokens - promptTokens + 1;
    return {
      text: out.responseText,
      finish: out.stopReason === "maxTokens" ? "length" : "stop",
      usage: {
        prompt_tokens: promptTokens,
        completion_tokens: completionTokens,
        total_tokens: promptTokens + completionTokens,
      },
    };
  } finally {
    session.dispose({ disposeSequence: false });
  }
}

function send(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(data) });
  res.end(data);
}

function error(res, status, message, param = null, code = null) {
  send(res, status, { error: { message, type: "invalid_request_error", param, code } });
}

async function completions(res, body) {
  const req = parse(body);
  const id = `chatcmpl-${randomUUID()}`;
  const created = Math.floor(Date.now() / 1000);
  const chunk = (choices, extra = {}) =>
    `data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model: alias, choices, ...extra })}\n\n`;

  // A client that hangs up stops its generation.
  const abort = new AbortController();
  res.on("close", () => abort.abort());

  if (!req.stream) {
    const out = await exclusive(() => generate(req, undefined, abort.signal));
    return send(res, 200, {
      id,
      object: "chat.completion",
      created,
      model: alias,
      choices: [{ index: 0, message: { role: "assistant", content: out.text }, finish_reason: out.finish }],
      usage: out.usage,
    });
  }
  // The first byte goes out when this request's turn comes, as from a
  // server that starts generating then.
  const out = await exclusive(() => {
    if (abort.signal.aborted) return null; // hung up while waiting
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    res.write(chunk([{ index: 0, delta: { role: "assistant", content: "" }, finish_reason: null }]));
    return generate(req, (t) => t && res.write(chunk([{ index: 0, delta: { content: t }, finish_reason: null }])), abort.signal);
  });
  if (!out) return;
  res.write(chunk([{ index: 0, delta: {}, finish_reason: out.finish }]));
  if (req.includeUsage) res.write(chunk([], { usage: out.usage }));
  res.end("data: [DONE]\n\n");
}

const server = http.createServer(async (req, res) => {
  try {
    if (req.method === "GET" && req.url === "/v1/models")
      return send(res, 200, { object: "list", data: [{ id: alias, object: "model", created: 0, owned_by: "inferq" }] });
    if (req.method === "POST" && req.url === "/v1/chat/completions") {
      // Bytes first, decoded once: a character split across two chunks
      // would not survive decoding each chunk on its own.
      const parts = [];
      for await (const part of req) parts.push(part);
      let body;
      try {
        body = JSON.parse(Buffer.concat(parts).toString("utf8"));
      } catch (e) {
        return error(res, 400, `the body is not JSON: ${e.message}`);
      }
      return await completions(res, body);
    }
    error(res, 404, `no route ${req.method} ${req.url}`);
  } catch (e) {
    if (res.headersSent) return res.destroy(e);
    if (e instanceof BadRequest) return error(res, e.status, e.message, e.param, e.code);
    send(res, 500, { error: { message: String(e?.message ?? e), type: "server_error", param: null, code: null } });
  }
});
server.listen(port, "127.0.0.1", () => console.log(`listening on http://127.0.0.1:${port}`));
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(0));
