// The OpenGLM chat app: sign in, chat (streamed, stoppable, saved per account), infill, usage, keys.
import { api, ApiError, clearKey, describe, getKey, NetworkError, setKey, stream } from "./api.js";
import { applyTranslations, language, setLanguage, t } from "./i18n.js";
import { renderMarkdown } from "./markdown.js";
import { drawUsageChart } from "./chart.js";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function money(units) {
  return (units / 1e6).toLocaleString(undefined, {minimumFractionDigits: 2, maximumFractionDigits: 6});
}

function when(iso) {
  return new Date(iso).toLocaleString(language() === "zh" ? "zh-CN" : undefined);
}

// ---------------------------------------------------------------------------------------- state

const state = {
  account: null,
  view: "chat",
  conversation: null,   // {id, title, ...} of the open conversation, or null for a new one
  messages: [],         // the open conversation's user/assistant/tool messages (system prompt kept apart)
  savedSystem: "",      // the system prompt as stored with the conversation
  controller: null,     // the AbortController of the answer being streamed
};

// ---------------------------------------------------------------------------------------- look

function applyTheme() {
  const theme = localStorage.getItem("openglm-theme") || "auto";
  const dark = theme === "dark" || (theme === "auto" && matchMedia("(prefers-color-scheme: dark)").matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("hljs-dark").media = dark ? "all" : "not all";
  $("hljs-light").media = dark ? "not all" : "all";
  for (const b of document.querySelectorAll(".theme-toggle")) b.textContent = t("nav.theme." + theme);
}

function retranslate() {
  applyTranslations();
  for (const b of document.querySelectorAll(".lang-toggle")) b.textContent = t("nav.lang");
  // The hint's `commands` shown as code.
  $("signin-hint").replaceChildren(...t("signin.hint").split("`").map((part, i) => i % 2 ? el("code", {text: part}) : part));
  applyTheme();
  if (!$("infill-input").value) $("infill-input").value = t("infill.example");
  if (!$("app").hidden) {
    renderConversationList();
    renderLog();
    if (state.view === "usage") showUsage();
    if (state.view === "keys") showKeys();
  }
}

// `append`: keep what the banner says and add this below it (a second error after a first one).
function showBanner(message, append = false) {
  const banner = $("banner");
  if (append && !banner.hidden && message) message = banner.textContent + "\n" + message;
  banner.textContent = message;
  banner.hidden = !message;
}

// A 401 anywhere means the key stopped working (revoked meanwhile): back to the sign-in screen.
function handleError(error, target, append = false) {
  if (error instanceof ApiError && error.status === 401) {
    signOut(t("err.signedOut", {message: error.message}));
    return;
  }
  const message = describe(error);
  if (target) {
    target.textContent = message;
    target.hidden = false;
  } else {
    showBanner(message, append);
  }
}

// ---------------------------------------------------------------------------------------- sign in

async function signIn(secret) {
  const error = $("signin-error");
  error.hidden = true;
  $("signin-button").disabled = true;
  $("signin-button").textContent = t("signin.checking");
  try {
    state.account = await api("v1/account", {key: secret});
    setKey(secret);
    $("key").value = "";
    $("signin").hidden = true;
    $("app").hidden = false;
    showBanner(state.account.available > 0 ? "" : t("err.balance"));
    await Promise.all([loadModels(), loadConversations()]);
    newChat();
    showView(state.view);
  } catch (e) {
    error.textContent = describe(e);
    error.hidden = false;
  } finally {
    $("signin-button").disabled = false;
    $("signin-button").textContent = t("signin.button");
  }
}

function signOut(message = "") {
  if (state.controller) state.controller.abort();
  clearKey();
  state.account = null;
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  $("signin-error").hidden = !message;
  $("key").focus();
}

async function loadModels() {
  const list = await api("v1/models");
  const select = $("model");
  const previous = select.value || localStorage.getItem("openglm-model");
  select.textContent = "";
  for (const m of list.data) select.add(new Option(m.id, m.id));
  if (previous && list.data.some((m) => m.id === previous)) select.value = previous;
}

// ---------------------------------------------------------------------------------------- views

function showView(view) {
  state.view = view;
  for (const v of ["chat", "infill", "usage", "keys"]) $("view-" + v).hidden = v !== view;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === view);
  document.body.classList.remove("sidebar-open");
  if (view === "usage") showUsage();
  if (view === "keys") showKeys();
  if (view === "chat") $("input").focus();
}

// ---------------------------------------------------------------------------------------- conversations

let conversationList = [];

async function loadConversations() {
  const q = $("search").value.trim();
  try {
    const result = await api("v1/conversations?limit=200" + (q ? "&q=" + encodeURIComponent(q) : ""));
    conversationList = result.data;
    renderConversationList();
  } catch (e) {
    handleError(e);
  }
}

function renderConversationList() {
  const list = $("conversations");
  list.textContent = "";
  if (!conversationList.length) {
    list.append(el("li", {class: "empty", text: t($("search").value.trim() ? "chat.noMatch" : "chat.empty")}));
  }
  for (const c of conversationList) {
    const title = c.title || t("chat.untitled");
    const item = el("li", {class: "conversation" + (state.conversation && state.conversation.id === c.id ? " active" : ""),
                           "data-id": c.id},
      el("button", {type: "button", class: "open", text: title, title, onclick: () => openConversation(c.id)}),
      el("button", {type: "button", class: "icon rename", title: t("msg.rename"), "aria-label": t("msg.rename"),
                    text: "✎", onclick: () => renameConversation(c)}),
      el("button", {type: "button", class: "icon delete", title: t("msg.delete"), "aria-label": t("msg.delete"),
                    text: "✕", onclick: () => deleteConversation(c)}));
    list.append(item);
  }
}

async function openConversation(id) {
  if (state.controller) return;
  try {
    const conv = await api("v1/conversations/" + id);
    state.conversation = conv;
    const system = conv.messages.length && conv.messages[0].role === "system" ? conv.messages[0].content : "";
    state.savedSystem = system;
    $("system").value = system;
    state.messages = conv.messages.filter((m, i) => !(i === 0 && m.role === "system"));
    if (conv.model && [...$("model").options].some((o) => o.value === conv.model)) $("model").value = conv.model;
    $("status").textContent = "";
    renderConversationList();
    renderLog();
    showView("chat");
  } catch (e) {
    handleError(e);
  }
}

function newChat() {
  if (state.controller) return;
  state.conversation = null;
  state.messages = [];
  state.savedSystem = $("system").value;
  $("status").textContent = "";
  renderConversationList();
  renderLog();
  showView("chat");
}

async function renameConversation(c) {
  const title = prompt(t("chat.renamePrompt"), c.title);
  if (title === null) return;
  try {
    const renamed = await api("v1/conversations/" + c.id, {method: "PATCH", body: {title: title.trim().slice(0, 200)}});
    if (state.conversation && state.conversation.id === c.id) state.conversation.title = renamed.title;
    await loadConversations();
  } catch (e) {
    handleError(e);
  }
}

async function deleteConversation(c) {
  if (!confirm(t("chat.deleteConfirm", {title: c.title || t("chat.untitled")}))) return;
  try {
    await api("v1/conversations/" + c.id, {method: "DELETE"});
    if (state.conversation && state.conversation.id === c.id) newChat();
    await loadConversations();
  } catch (e) {
    handleError(e);
  }
}

// Saves the messages from position `from` of the open conversation (creating it first if needed),
// replacing whatever the server held from there on. Positions count the system prompt, if any.
async function save(from) {
  const system = $("system").value.trim();
  const stored = system ? [{role: "system", content: system}, ...state.messages] : [...state.messages];
  const offset = system ? 1 : 0;
  let start = from + offset;
  if (system !== state.savedSystem) start = 0;  // the system prompt changed: rewrite from the top
  const model = $("model").value || undefined;
  if (!state.conversation) {
    state.conversation = await api("v1/conversations", {method: "POST", body: {model, messages: stored}});
  } else {
    const tail = stored.slice(start);
    if (!tail.length) return;
    state.conversation = await api(`v1/conversations/${state.conversation.id}/messages`,
                                   {method: "POST", body: {keep: start, messages: tail, model}});
  }
  state.savedSystem = system;
  await loadConversations();
}

// ---------------------------------------------------------------------------------------- chat log

function renderLog() {
  const log = $("log");
  log.textContent = "";
  if (!state.messages.length) log.append(el("p", {class: "welcome", text: t("chat.welcome")}));
  state.messages.forEach((m, i) => log.append(messageElement(m, i)));
  log.scrollTop = log.scrollHeight;
}

function copyButton(getText) {
  const button = el("button", {type: "button", class: "small", text: t("msg.copy")});
  button.addEventListener("click", async () => {
    await navigator.clipboard.writeText(getText()).catch(() => {});
    button.textContent = t("msg.copied");
    setTimeout(() => { button.textContent = t("msg.copy"); }, 1200);
  });
  return button;
}

function messageElement(m, index) {
  const body = el("div", {class: "body"});
  const node = el("div", {class: `msg ${m.role}`, "data-index": String(index)}, body);
  if (m.role === "user") {
    body.textContent = m.content;
  } else if (m.role === "tool") {
    body.append(el("div", {class: "tool-label", text: "⚙ tool"}), el("pre", {text: m.content}));
  } else if (m.content) {
    renderMarkdown(body, m.content);
    addCodeCopyButtons(body);
  }
  for (const call of m.tool_calls || []) {
    const fn = call.function || {};
    node.append(el("div", {class: "tool-call"},
      el("div", {class: "tool-label", text: `⚙ ${t("msg.toolCall")}: ${fn.name}`}),
      el("pre", {text: prettyJson(fn.arguments)})));
  }
  if (m.stopped) node.append(el("span", {class: "badge", text: t("msg.stopped")}));
  const actions = el("div", {class: "actions"});
  actions.append(copyButton(() => m.content));
  const busy = () => !!state.controller;
  if (m.role === "user") {
    actions.append(el("button", {type: "button", class: "small edit", text: t("msg.edit"),
                                 onclick: () => { if (!busy()) editMessage(node, index); }}));
  }
  if (m.role === "assistant" && index === state.messages.length - 1) {
    actions.append(el("button", {type: "button", class: "small regenerate", text: t("msg.regenerate"),
                                 onclick: () => { if (!busy()) regenerate(); }}));
  }
  node.append(actions);
  return node;
}

function prettyJson(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return String(text); }
}

function addCodeCopyButtons(body) {
  for (const pre of body.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (code) pre.prepend(copyButton(() => code.textContent));
  }
}

function editMessage(node, index) {
  const original = state.messages[index].content;
  const editor = el("textarea", {class: "editor", rows: "3"});
  editor.value = original;
  const form = el("div", {class: "edit-form"}, editor,
    el("div", {class: "actions"},
      el("button", {type: "button", class: "small primary resend", text: t("msg.resend"), onclick: () => {
        const text = editor.value.trim();
        if (!text) return;
        state.messages = state.messages.slice(0, index);
        generate(text, index);
      }}),
      el("button", {type: "button", class: "small", text: t("msg.cancel"), onclick: renderLog})));
  node.replaceChildren(form);
  editor.focus();
}

function regenerate() {
  const last = state.messages.length - 1;
  if (last < 1 || state.messages[last].role !== "assistant") return;
  state.messages = state.messages.slice(0, last);
  generate(null, last);
}

// ---------------------------------------------------------------------------------------- generation

function numberOf(id, fallback) {
  const value = parseFloat($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

// Streams an answer. `text`: a new user message to add first (null: answer the messages as they are,
// as regenerate does). `from`: the first position that changed, for saving.
async function generate(text, from) {
  if (state.controller) return;
  showBanner("");
  if (text !== null) state.messages.push({role: "user", content: text});
  renderLog();
  const answer = {role: "assistant", content: ""};
  const node = messageElement(answer, state.messages.length);
  node.classList.add("streaming");
  $("log").append(node);
  const body = node.querySelector(".body");
  const controller = new AbortController();
  state.controller = controller;
  $("send").hidden = true;
  $("stop").hidden = false;
  $("status").textContent = t("chat.generating");

  const system = $("system").value.trim();
  const request = {
    model: $("model").value,
    messages: [...(system ? [{role: "system", content: system}] : []),
               ...state.messages.map(({role, content, tool_calls}) => ({role, content, ...(tool_calls ? {tool_calls} : {})}))],
    stream: true, stream_options: {include_usage: true},
    temperature: numberOf("temperature", 0.8), top_p: numberOf("top-p", 1),
    max_tokens: Math.max(1, Math.round(numberOf("max-tokens", 256))),
  };
  localStorage.setItem("openglm-model", request.model);
  let usage = null, pending = false, toolCalls = [], requestId = null;
  const paint = () => {
    pending = false;
    renderMarkdown(body, answer.content.replace(/^\n/, ""));
    $("log").scrollTop = $("log").scrollHeight;
  };
  try {
    await save(from).catch((e) => { if (e instanceof ApiError && e.status === 401) throw e; handleError(e); });
    await stream("v1/chat/completions", request, (event) => {
      if (event.usage) usage = event.usage;
      if (event.id) requestId = event.id.replace(/^chatcmpl-/, "");
      for (const choice of event.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) {
          answer.content += delta.content;
          if (!pending) { pending = true; requestAnimationFrame(paint); }
        }
        if (delta.tool_calls) toolCalls = toolCalls.concat(delta.tool_calls.map(({index, ...call}) => call));
      }
    }, controller.signal);
    $("status").textContent = usage ? t("chat.usage", {prompt: usage.prompt_tokens, completion: usage.completion_tokens}) : "";
  } catch (e) {
    if (e.name === "AbortError") {
      answer.stopped = true;
      $("status").textContent = "";
      pollStoppedUsage(requestId);
    } else {
      $("status").textContent = "";
      node.classList.add("error");
      handleError(e, null);
      if (!(e instanceof NetworkError && e.kind === "midStream")) {
        // Nothing usable arrived: show the error in place of the answer, keep the question.
        node.replaceChildren(el("div", {class: "body error-text", text: describe(e)}));
      }
    }
  } finally {
    state.controller = null;
    $("send").hidden = false;
    $("stop").hidden = true;
  }
  answer.content = answer.content.replace(/^\n/, "");
  if (toolCalls.length) answer.tool_calls = toolCalls;
  if (answer.content || toolCalls.length) {
    state.messages.push(answer);
    try {
      await save(state.messages.length - 1);
    } catch (e) {
      handleError(e, null, true);
    }
  }
  if (!node.classList.contains("error") || answer.content) renderLog();
  $("input").focus();
}

// After Stop the server bills what it generated, a moment later; show that once the ledger has it.
async function pollStoppedUsage(requestId) {
  for (let attempt = 0; requestId && attempt < 20; attempt++) {
    try {
      const recent = await api("v1/usage/requests?limit=10");
      const row = recent.data.find((r) => r.request_id === requestId);
      if (row) {
        $("status").textContent = t("chat.stopped", {completion: row.completion_tokens});
        return;
      }
    } catch {
      return;  // the answer itself is what matters; the figure is a courtesy
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ---------------------------------------------------------------------------------------- infill

const MASKS = /(\[MASK\]|\[sMASK\]|\[gMASK\])/;

async function runInfill() {
  const prompt = $("infill-input").value;
  const error = $("infill-error");
  error.hidden = true;
  $("infill-run").disabled = true;
  $("infill-status").textContent = t("chat.generating");
  try {
    const result = await api("v1/infill", {method: "POST", body: {
      model: $("model").value, prompt, max_tokens: Math.max(1, Math.round(numberOf("infill-max-tokens", 16))),
      temperature: numberOf("infill-temperature", 0)}});
    const out = $("infill-result");
    out.textContent = "";
    let blank = 0;
    for (const piece of prompt.split(MASKS)) {
      if (MASKS.test(piece)) {
        out.append(el("mark", {class: "span", title: piece, text: result.spans[blank++] ?? ""}));
      } else {
        out.append(document.createTextNode(piece));
      }
    }
    $("infill-status").textContent = t("infill.usage", {prompt: result.usage.prompt_tokens,
                                                         completion: result.usage.completion_tokens, blanks: blank});
  } catch (e) {
    $("infill-status").textContent = "";
    handleError(e, error);
  } finally {
    $("infill-run").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------- usage

async function showUsage() {
  try {
    const since = new Date(Date.now() - 29 * 86400e3).toISOString().slice(0, 10);
    const [account, report, recent] = await Promise.all([
      api("v1/account"), api("v1/usage?since=" + since), api("v1/usage/requests?limit=50")]);
    state.account = account;
    $("balance").textContent = money(account.balance);
    $("available").textContent = money(account.available);
    $("tokens-total").textContent = report.usage.reduce((s, r) => s + r.total_tokens, 0).toLocaleString();
    $("cost-total").textContent = money(report.usage.reduce((s, r) => s + r.cost, 0));
    drawUsageChart($("chart"), $("chart-legend"), report.usage, since);
    const body = $("requests").tBodies[0];
    body.textContent = "";
    if (!recent.data.length) body.append(el("tr", {}, el("td", {colspan: "7", class: "empty", text: t("usage.none")})));
    for (const r of recent.data) {
      body.append(el("tr", {"data-request-id": r.request_id},
        el("td", {text: when(r.created_at), title: r.request_id}), el("td", {text: r.model}),
        el("td", {class: "num", text: String(r.prompt_tokens)}), el("td", {class: "num", text: String(r.completion_tokens)}),
        el("td", {class: "num", text: money(r.cost)}), el("td", {class: "num", text: `${r.latency_ms} ms`}),
        el("td", {text: r.finish_reason})));
    }
  } catch (e) {
    handleError(e);
  }
}

// ---------------------------------------------------------------------------------------- keys

async function showKeys() {
  try {
    const keys = (await api("v1/keys")).data;
    const body = $("keys").tBodies[0];
    body.textContent = "";
    for (const k of keys) {
      const expired = k.expires_at && new Date(k.expires_at) <= new Date();
      const status = k.revoked_at ? "revoked" : expired ? "expired" : "active";
      const cells = [el("td", {}, el("code", {text: k.prefix + "…"})), el("td", {text: k.name || ""}),
                     el("td", {text: when(k.created_at)}),
                     el("td", {class: "status-" + status, text: t("keys." + status) + (k.current ? ` (${t("keys.current")})` : "")})];
      const action = el("td");
      if (status === "active") {
        action.append(el("button", {type: "button", class: "small danger revoke", text: t("keys.revoke"),
                                    onclick: () => revokeKey(k)}));
      }
      body.append(el("tr", {"data-key-id": String(k.id)}, ...cells, action));
    }
  } catch (e) {
    handleError(e);
  }
}

async function createKey(event) {
  event.preventDefault();
  try {
    const made = await api("v1/keys", {method: "POST", body: {name: $("key-name").value.trim() || null}});
    $("key-name").value = "";
    $("new-key-secret").textContent = made.secret;
    $("new-key").hidden = false;
    await showKeys();
  } catch (e) {
    handleError(e);
  }
}

async function revokeKey(k) {
  if (!confirm(t("keys.revokeConfirm", {prefix: k.prefix}))) return;
  try {
    await api("v1/keys/" + k.id, {method: "DELETE"});
    if (k.current) {
      signOut(t("err.revoked"));
      return;
    }
    await showKeys();
  } catch (e) {
    handleError(e);
  }
}

// ---------------------------------------------------------------------------------------- wiring

function bind() {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const secret = $("key").value.trim();
    if (secret) signIn(secret);
  });
  $("signout").addEventListener("click", () => signOut());
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showView(b.dataset.view));
  for (const b of document.querySelectorAll(".lang-toggle")) {
    b.addEventListener("click", () => { setLanguage(language() === "zh" ? "en" : "zh"); retranslate(); });
  }
  for (const b of document.querySelectorAll(".theme-toggle")) {
    b.addEventListener("click", () => {
      const order = ["auto", "light", "dark"];
      const now = localStorage.getItem("openglm-theme") || "auto";
      localStorage.setItem("openglm-theme", order[(order.indexOf(now) + 1) % order.length]);
      applyTheme();
    });
  }
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);
  $("menu").addEventListener("click", () => { showView("chat"); document.body.classList.add("sidebar-open"); });
  document.querySelector(".chat-main").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
  $("banner").addEventListener("click", () => showBanner(""));
  $("new-chat").addEventListener("click", newChat);
  let searchTimer = null;
  $("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(loadConversations, 250); });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    generate(text, state.messages.length);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", stop);
  $("infill-run").addEventListener("click", runInfill);
  $("infill-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); runInfill(); }
  });
  $("key-form").addEventListener("submit", createKey);
  $("new-key-copy").addEventListener("click", () => navigator.clipboard.writeText($("new-key-secret").textContent).catch(() => {}));
  document.addEventListener("keydown", (e) => {
    if ($("app").hidden) return;
    const mod = e.ctrlKey || e.metaKey;
    if (e.key === "Escape" && state.controller) { e.preventDefault(); stop(); }
    else if (mod && e.key.toLowerCase() === "k") { e.preventDefault(); showView("chat"); $("search").focus(); }
    else if (mod && e.shiftKey && e.key.toLowerCase() === "o") { e.preventDefault(); newChat(); }
    else if (mod && e.key === "/") { e.preventDefault(); setLanguage(language() === "zh" ? "en" : "zh"); retranslate(); }
  });
}

bind();
retranslate();
if (getKey()) {
  signIn(getKey());
} else {
  $("signin").hidden = false;
  $("key").focus();
}
