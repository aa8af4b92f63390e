// The page's text in English and Chinese; `t(key, values)` fills {name} placeholders.
const STRINGS = {
  en: {
    "signin.lead": "Chat with the model this server serves, try GLM blank infilling, and see what you spend.",
    "signin.label": "API key",
    "signin.button": "Sign in",
    "signin.hint": "No key yet? Use the “API key:” line that `openglm serve` printed when it first started, " +
      "or ask the server's admin to run `openglm keys create --account NAME`.",
    "signin.checking": "Checking the key…",
    "nav.menu": "Conversations", "nav.chat": "Chat", "nav.infill": "Infill", "nav.usage": "Usage", "nav.keys": "Keys",
    "nav.signout": "Sign out", "nav.lang": "中文", "nav.theme.auto": "◐ Auto", "nav.theme.light": "☀ Light",
    "nav.theme.dark": "☾ Dark",
    "chat.new": "New chat", "chat.search": "Search conversations", "chat.settings": "Model and settings",
    "chat.model": "Model", "chat.temperature": "Temperature", "chat.topP": "Top-p", "chat.maxTokens": "Max tokens",
    "chat.system": "System prompt", "chat.systemPlaceholder": "e.g. You are a concise assistant.",
    "chat.placeholder": "Message (Enter sends, Shift+Enter: new line)", "chat.send": "Send", "chat.stop": "Stop",
    "chat.shortcuts": "Enter send · Shift+Enter new line · Esc stop · Ctrl+K search · Ctrl+Shift+O new chat · Ctrl+/ language",
    "chat.untitled": "New chat", "chat.empty": "No conversations yet.", "chat.noMatch": "No conversation matches.",
    "chat.generating": "Generating…", "chat.usage": "{prompt} prompt + {completion} completion tokens",
    "chat.stopped": "Stopped: {completion} tokens generated and billed.",
    "chat.renamePrompt": "New title:", "chat.deleteConfirm": "Delete “{title}”?",
    "chat.welcome": "Ask anything. Answers stream in as Markdown, with code, tables and LaTeX.",
    "msg.copy": "Copy", "msg.copied": "Copied", "msg.edit": "Edit", "msg.regenerate": "Regenerate",
    "msg.resend": "Send", "msg.cancel": "Cancel", "msg.rename": "Rename", "msg.delete": "Delete",
    "msg.toolCall": "Tool call", "msg.stopped": "stopped",
    "infill.title": "Blank infilling", "infill.run": "Fill the blanks",
    "infill.lead": "Write text with [MASK] (a short span), [sMASK] (a sentence) or [gMASK] (to the end) " +
      "blanks; GLM reads the text on both sides and fills each one. Ctrl+Enter runs.",
    "infill.example": "The General Language Model is pretrained with an [MASK] objective.",
    "infill.usage": "{prompt} prompt + {completion} generated tokens, {blanks} blanks",
    "usage.balance": "Balance", "usage.available": "Available", "usage.tokens30": "Tokens, 30 days",
    "usage.cost30": "Cost, 30 days", "usage.chartTitle": "Tokens by day and model (last 30 days)",
    "usage.recent": "Recent requests", "usage.time": "Time", "usage.prompt": "Prompt", "usage.completion": "Completion",
    "usage.cost": "Cost", "usage.latency": "Latency", "usage.finish": "Finish", "usage.none": "No requests yet.",
    "keys.title": "API keys", "keys.create": "Create key", "keys.namePlaceholder": "Name (optional), e.g. laptop",
    "keys.once": "Your new key. Copy it now: it is shown only this once.",
    "keys.prefix": "Key", "keys.name": "Name", "keys.created": "Created", "keys.status": "Status",
    "keys.revoke": "Revoke", "keys.active": "active", "keys.revoked": "revoked", "keys.expired": "expired",
    "keys.current": "this session", "keys.revokeConfirm": "Revoke {prefix}…? Anything using it stops working.",
    "err.badKey": "This API key is not valid. Check it, or create one (see below).",
    "err.malformedKey": "That is not an OpenGLM API key: keys start with sk-glm-.",
    "err.revoked": "This API key was revoked or has expired. Sign in with another key.",
    "err.rateLimited": "Rate limited: this key has reached its limit. Try again in {seconds} s.",
    "err.balance": "Out of balance: the account cannot pay for this request. Ask the admin to top it up " +
      "(`openglm accounts top-up`), or lower Max tokens.",
    "err.server": "The server failed ({status}): {message}",
    "err.network": "The server cannot be reached (network lost or server down).",
    "err.midStream": "The connection was lost in the middle of the answer; what arrived is kept.",
    "err.other": "Error {status}: {message}",
    "err.signedOut": "Your key stopped working: {message} Sign in again.",
  },
  zh: {
    "signin.lead": "与本服务器上的模型对话，试用 GLM 空白填充，并查看用量和花费。",
    "signin.label": "API 密钥",
    "signin.button": "登录",
    "signin.hint": "还没有密钥？使用 `openglm serve` 首次启动时打印的 “API key:” 那一行，" +
      "或请服务器管理员运行 `openglm keys create --account 名称`。",
    "signin.checking": "正在检查密钥…",
    "nav.menu": "对话列表", "nav.chat": "对话", "nav.infill": "填空", "nav.usage": "用量", "nav.keys": "密钥",
    "nav.signout": "退出", "nav.lang": "EN", "nav.theme.auto": "◐ 自动", "nav.theme.light": "☀ 浅色",
    "nav.theme.dark": "☾ 深色",
    "chat.new": "新对话", "chat.search": "搜索对话", "chat.settings": "模型与参数",
    "chat.model": "模型", "chat.temperature": "温度", "chat.topP": "Top-p", "chat.maxTokens": "最大 token 数",
    "chat.system": "系统提示词", "chat.systemPlaceholder": "例如：你是一个简洁的助手。",
    "chat.placeholder": "输入消息（Enter 发送，Shift+Enter 换行）", "chat.send": "发送", "chat.stop": "停止",
    "chat.shortcuts": "Enter 发送 · Shift+Enter 换行 · Esc 停止 · Ctrl+K 搜索 · Ctrl+Shift+O 新对话 · Ctrl+/ 切换语言",
    "chat.untitled": "新对话", "chat.empty": "还没有对话。", "chat.noMatch": "没有匹配的对话。",
    "chat.generating": "生成中…", "chat.usage": "提示 {prompt} + 生成 {completion} 个 token",
    "chat.stopped": "已停止：生成并计费 {completion} 个 token。",
    "chat.renamePrompt": "新标题：", "chat.deleteConfirm": "删除“{title}”？",
    "chat.welcome": "随便问。回答以 Markdown 流式显示，支持代码、表格和 LaTeX。",
    "msg.copy": "复制", "msg.copied": "已复制", "msg.edit": "编辑", "msg.regenerate": "重新生成",
    "msg.resend": "发送", "msg.cancel": "取消", "msg.rename": "重命名", "msg.delete": "删除",
    "msg.toolCall": "工具调用", "msg.stopped": "已停止",
    "infill.title": "空白填充", "infill.run": "填空",
    "infill.lead": "在文本中写入 [MASK]（短片段）、[sMASK]（句子）或 [gMASK]（直到结尾）空白；" +
      "GLM 双向阅读上下文并逐一填充。Ctrl+Enter 运行。",
    "infill.example": "清华大学位于[MASK]。",
    "infill.usage": "提示 {prompt} + 生成 {completion} 个 token，{blanks} 个空白",
    "usage.balance": "余额", "usage.available": "可用", "usage.tokens30": "30 天 token 数",
    "usage.cost30": "30 天花费", "usage.chartTitle": "按日期和模型统计的 token（最近 30 天）",
    "usage.recent": "最近的请求", "usage.time": "时间", "usage.prompt": "提示", "usage.completion": "生成",
    "usage.cost": "花费", "usage.latency": "延迟", "usage.finish": "结束原因", "usage.none": "还没有请求。",
    "keys.title": "API 密钥", "keys.create": "创建密钥", "keys.namePlaceholder": "名称（可选），例如 laptop",
    "keys.once": "新密钥如下。请立即复制：它只显示这一次。",
    "keys.prefix": "密钥", "keys.name": "名称", "keys.created": "创建时间", "keys.status": "状态",
    "keys.revoke": "吊销", "keys.active": "有效", "keys.revoked": "已吊销", "keys.expired": "已过期",
    "keys.current": "当前会话", "keys.revokeConfirm": "吊销 {prefix}…？使用它的程序将无法继续工作。",
    "err.badKey": "API 密钥无效。请检查，或按下方说明创建一个。",
    "err.malformedKey": "这不是 OpenGLM 的 API 密钥：密钥以 sk-glm- 开头。",
    "err.revoked": "此 API 密钥已被吊销或已过期。请用其他密钥登录。",
    "err.rateLimited": "已限流：此密钥达到了速率上限。请 {seconds} 秒后重试。",
    "err.balance": "余额不足：账户无法支付此请求。请管理员充值（`openglm accounts top-up`），或调低最大 token 数。",
    "err.server": "服务器出错（{status}）：{message}",
    "err.network": "无法连接服务器（网络断开或服务器已停止）。",
    "err.midStream": "回答途中连接中断；已收到的内容已保留。",
    "err.other": "错误 {status}：{message}",
    "err.signedOut": "密钥已失效：{message} 请重新登录。",
  },
};

let lang = localStorage.getItem("openglm-lang") || (navigator.language.startsWith("zh") ? "zh" : "en");

export function language() { return lang; }

export function setLanguage(value) {
  lang = value in STRINGS ? value : "en";
  localStorage.setItem("openglm-lang", lang);
  applyTranslations();
}

export function t(key, values = {}) {
  const text = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

// Fills every element marked data-i18n (text), data-i18n-placeholder and data-i18n-title.
export function applyTranslations(root = document) {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
}
