// The usage chart: tokens per day for 30 days as SVG bars stacked by model, drawn here (no chart library).
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#3b6cf6", "#f08a24", "#1fa37a", "#c2417b", "#7a5af0", "#8a8f98"];

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * step).find((m) => m >= value);
}

// rows: /v1/usage's {date, model, total_tokens, cost, ...}; since: "YYYY-MM-DD", the first day drawn.
export function drawUsageChart(container, legend, rows, since) {
  const days = [];
  for (let d = new Date(since + "T00:00:00Z"); days.length < 30; d = new Date(d.getTime() + 86400e3)) {
    days.push(d.toISOString().slice(0, 10));
  }
  const models = [...new Set(rows.map((r) => r.model))].sort();
  const byDay = new Map(days.map((d) => [d, new Map()]));
  for (const r of rows) byDay.get(r.date)?.set(r.model, (byDay.get(r.date).get(r.model) || 0) + r.total_tokens);
  const totals = days.map((d) => [...byDay.get(d).values()].reduce((a, b) => a + b, 0));
  const top = niceMax(Math.max(0, ...totals));

  // Drawn at the container's pixel width (not scaled), so text stays the page's size at any width.
  const width = Math.max(300, container.clientWidth || 720), height = 220, left = 48, bottom = 24, right = 8, topPad = 8;
  const plotW = width - left - right, plotH = height - bottom - topPad, slot = plotW / days.length;
  const root = svg("svg", {width, height, viewBox: `0 0 ${width} ${height}`, role: "img", class: "usage-chart",
                           "aria-label": `tokens per day; the busiest day had ${Math.max(0, ...totals)}`});
  for (const frac of [0, 0.5, 1]) {
    const y = topPad + plotH * (1 - frac);
    root.append(svg("line", {x1: left, x2: width - right, y1: y, y2: y, class: "grid"}));
    root.append(svg("text", {x: left - 6, y: y + 4, "text-anchor": "end", class: "axis"},
                    Math.round(top * frac).toLocaleString()));
  }
  days.forEach((day, i) => {
    let y = topPad + plotH;
    models.forEach((model, m) => {
      const value = byDay.get(day).get(model) || 0;
      if (!value) return;
      const h = Math.max(1, (value / top) * plotH);
      y -= h;
      const bar = svg("rect", {x: left + i * slot + slot * 0.15, y, width: slot * 0.7, height: h,
                               fill: COLORS[m % COLORS.length], class: "bar", "data-day": day, "data-model": model});
      bar.append(svg("title", {}, `${day} · ${model}: ${value.toLocaleString()} tokens`));
      root.append(bar);
    });
    const every = width < 500 ? 10 : 5;
    if (i % every === 0 || i === days.length - 1) {
      root.append(svg("text", {x: left + i * slot + slot / 2, y: height - 6, "text-anchor": "middle", class: "axis"},
                      day.slice(5)));
    }
  });
  container.replaceChildren(root);
  legend.replaceChildren(...models.map((model, m) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.className = "swatch swatch-" + (m % COLORS.length);
    item.append(swatch, model);
    return item;
  }));
}
