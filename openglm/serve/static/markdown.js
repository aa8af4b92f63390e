// Markdown to safe HTML: marked (GitHub-flavoured: tables, code), highlight.js for code, KaTeX for
// $…$ / $$…$$ / \(…\) / \[…\] math, then DOMPurify. Raw HTML in an answer is shown as text, never run.
/* global marked, DOMPurify, hljs, katex */

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function tex(source, displayMode) {
  try {
    // The strict Content-Security-Policy refuses style attributes in parsed markup (even in the
    // sanitiser's inert document); KaTeX positions glyphs with them. Carry them as data-style, which
    // applyStyles turns into CSSOM styles. (KaTeX escapes attribute values, so `"` ends the value.)
    return katex.renderToString(source, {displayMode, throwOnError: false, output: "htmlAndMathml"})
      .replace(/ style="/g, ' data-style="');
  } catch {
    return `<code>${escapeHtml(source)}</code>`;
  }
}

const blockMath = {
  name: "blockMath", level: "block",
  start: (src) => src.match(/\$\$|\\\[/)?.index,
  tokenizer(src) {
    const m = /^\$\$([\s\S]+?)\$\$/.exec(src) || /^\\\[([\s\S]+?)\\\]/.exec(src);
    if (m) return {type: "blockMath", raw: m[0], text: m[1].trim()};
  },
  renderer: (token) => `<div class="math-block">${tex(token.text, true)}</div>`,
};

const inlineMath = {
  name: "inlineMath", level: "inline",
  start: (src) => src.match(/\$|\\\(/)?.index,
  tokenizer(src) {
    // $x$ with no space inside the dollars (so "costs $5 and $6" stays text), or \(x\).
    const m = /^\$(?!\s)([^$\n]+?)(?<!\s)\$(?!\d)/.exec(src) || /^\\\(([\s\S]+?)\\\)/.exec(src);
    if (m) return {type: "inlineMath", raw: m[0], text: m[1]};
  },
  renderer: (token) => tex(token.text, false),
};

let parser = null;

function makeParser() {
  const md = new marked.Marked({gfm: true, breaks: true});
  md.use({
    extensions: [blockMath, inlineMath],
    renderer: {
      html: (token) => escapeHtml(token.text),
      code(token) {
        const lang = (token.lang || "").split(/\s/)[0];
        const known = lang && hljs.getLanguage(lang);
        const body = known ? hljs.highlight(token.text, {language: lang, ignoreIllegals: true}).value
          : escapeHtml(token.text);
        return `<pre><code class="hljs${known ? " language-" + escapeHtml(lang) : ""}">${body}</code></pre>`;
      },
    },
  });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
  return md;
}

function applyStyles(root) {
  for (const el of root.querySelectorAll("[data-style]")) {
    // Only KaTeX's own markup gets styles; anything else that carried one loses it.
    if (el.closest(".katex")) el.style.cssText = el.dataset.style;
    el.removeAttribute("data-style");
  }
}

// Renders `text` as Markdown into `element` (replacing what it held).
export function renderMarkdown(element, text) {
  parser ||= makeParser();
  const html = DOMPurify.sanitize(parser.parse(text), {ADD_ATTR: ["target"], FORBID_TAGS: ["style", "form"],
                                                       FORBID_ATTR: ["style"]});
  element.innerHTML = html;
  applyStyles(element);
}
