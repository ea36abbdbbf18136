// The report page's stylesheet and script (see report.hpp). Plain ES5-level JavaScript with no
// library: the page must work from a file:// URL with no network.
#include "assets.hpp"

namespace chaingrad::report::detail {

const char* const kStyle = R"CSS(
:root { --fg: #1d2430; --muted: #5b6575; --line: #d8dde5; --bg: #ffffff; --panel: #f6f8fb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); }
header { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .status { color: var(--muted); margin: 0; }
header .status.running { color: #b45309; }
main { padding: 8px 28px 40px; max-width: 1180px; }
section { margin: 22px 0; }
section h2 { font-size: 17px; margin: 0 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
p.note { color: var(--muted); margin: 4px 0 10px; max-width: 900px; }
table { border-collapse: collapse; }
table.kv td { padding: 2px 14px 2px 0; vertical-align: top; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.grid td, table.grid th { border: 1px solid var(--line); padding: 3px 8px; text-align: right;
                               font-variant-numeric: tabular-nums; }
table.grid th { background: var(--panel); font-weight: 600; }
table.grid td.name, table.grid th.name { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
svg { background: var(--bg); overflow: visible; }
svg text { font-size: 11px; fill: var(--fg); }
svg text.label { fill: var(--muted); font-size: 11.5px; }
svg text.legend { font-size: 11.5px; }
svg text.rowlabel { font-size: 11px; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
svg .plot-bg { fill: var(--panel); }
svg .grid { stroke: #e3e7ee; stroke-width: 1; }
svg .epoch { stroke: #8a94a6; stroke-dasharray: 4 3; stroke-width: 1; }
ul.warnings { list-style: none; padding: 0; margin: 0; }
ul.warnings li { border-left: 4px solid #dc2626; background: #fef2f2; padding: 6px 10px; margin: 6px 0; }
ul.warnings li.kind-saturated, ul.warnings li.kind-dead-relu { border-color: #d97706; background: #fffbeb; }
ul.warnings li.kind-large-update { border-color: #7c3aed; background: #f5f3ff; }
ul.warnings .kind { font-weight: 600; margin-right: 6px; }
ul.warnings .when { color: var(--muted); font-size: 12.5px; }
.ok { border-left: 4px solid #16a34a; background: #f0fdf4; padding: 6px 10px; }
.confusion td.cell { min-width: 44px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
body.only header, body.only #points-line { display: none; }
body.only main { padding-top: 4px; }
)CSS";

const char* const kScript = R"JS(
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var NS = 'http://www.w3.org/2000/svg';
  var total = 0;

  // #only=<section id> shows that section alone (for screenshots).
  var only = /only=([\w-]+)/.exec(location.hash);
  if (only) {
    document.body.classList.add('only');
    var sections = document.querySelectorAll('main > section');
    for (var i = 0; i < sections.length; ++i) if (sections[i].id !== only[1]) sections[i].style.display = 'none';
  }

  function el(parent, tag, attrs, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) if (attrs.hasOwnProperty(k)) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = String(text);
    parent.appendChild(e);
    return e;
  }
  function tip(e, text) { el(e, 'title', {}, text); }
  function finite(v) { return typeof v === 'number' && isFinite(v); }
  function sci(v) { return finite(v) ? v.toExponential(1) : '-'; }
  function frame(svg, w, h) {
    svg.setAttribute('viewBox', '0 0 ' + w + ' ' + h);
    svg.setAttribute('width', w);
    svg.setAttribute('height', h);
  }
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = (hi - lo) / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var out = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
    return out;
  }
  var VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  var REDS = [[255, 247, 236], [253, 187, 132], [239, 101, 72], [179, 0, 0], [90, 0, 0]];
  function ramp(stops, t) {
    t = Math.max(0, Math.min(1, t));
    var x = t * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    var a = stops[i], b = stops[i + 1], c = [];
    for (var k = 0; k < 3; ++k) c.push(Math.round(a[k] + (b[k] - a[k]) * f));
    return 'rgb(' + c.join(',') + ')';
  }

  // A line chart over training steps; returns the number of points drawn.
  function lineChart(svg, o) {
    var W = 540, H = 290, m = {l: 58, r: 16, t: 30, b: 42};
    frame(svg, W, H);
    var pw = W - m.l - m.r, ph = H - m.t - m.b, xmax = Math.max(1, o.xmax);
    var ys = [];
    o.series.forEach(function (s) { s.ys.forEach(function (v) { if (finite(v)) ys.push(v); }); });
    var ylo = o.ymin, yhi = o.ymax;
    if (ylo === undefined) {
      ylo = ys.length ? Math.min.apply(null, ys) : 0;
      yhi = ys.length ? Math.max.apply(null, ys) : 1;
      if (yhi - ylo < 1e-9) { ylo -= 0.5; yhi += 0.5; }
      var pad = (yhi - ylo) * 0.06;
      ylo = ylo >= 0 && ylo - pad < 0 ? 0 : ylo - pad;
      yhi += pad;
    }
    function X(x) { return m.l + pw * x / xmax; }
    function Y(y) { return m.t + ph * (1 - (y - ylo) / (yhi - ylo)); }
    var g = el(svg, 'g', {'class': 'axes'});
    el(g, 'rect', {x: m.l, y: m.t, width: pw, height: ph, 'class': 'plot-bg'});
    niceTicks(ylo, yhi, 5).forEach(function (t) {
      el(g, 'line', {x1: m.l, x2: m.l + pw, y1: Y(t), y2: Y(t), 'class': 'grid'});
      el(g, 'text', {x: m.l - 6, y: Y(t) + 4, 'text-anchor': 'end'}, o.percent ? Math.round(t * 100) + '%' : +t.toPrecision(3));
    });
    niceTicks(0, xmax, 6).forEach(function (t) {
      el(g, 'text', {x: X(t), y: m.t + ph + 15, 'text-anchor': 'middle'}, t);
    });
    (data.epochs || []).forEach(function (e) {
      el(g, 'line', {x1: X(e.step), x2: X(e.step), y1: m.t, y2: m.t + ph, 'class': 'epoch'});
    });
    el(g, 'text', {x: m.l + pw / 2, y: H - 6, 'text-anchor': 'middle', 'class': 'label'}, 'training step (dashed: end of an epoch)');
    el(g, 'text', {x: 14, y: m.t + ph / 2, 'text-anchor': 'middle', 'class': 'label',
                   transform: 'rotate(-90 14 ' + (m.t + ph / 2) + ')'}, o.ylabel);
    var drawn = 0, lx = m.l;
    o.series.forEach(function (s) {
      var d = '', pen = false;
      for (var i = 0; i < s.xs.length; ++i) {
        if (!finite(s.ys[i])) { pen = false; continue; }
        d += (pen ? 'L' : 'M') + X(s.xs[i]).toFixed(1) + ' ' + Y(s.ys[i]).toFixed(1);
        pen = true;
        ++drawn;
        if (s.markers) {
          var c = el(svg, 'circle', {cx: X(s.xs[i]), cy: Y(s.ys[i]), r: 4, fill: s.color, stroke: '#fff'});
          tip(c, s.name + ' at step ' + s.xs[i] + ': ' + (o.percent ? (100 * s.ys[i]).toFixed(2) + '%' : s.ys[i].toFixed(4)));
        }
      }
      if (d && s.line !== false)
        el(svg, 'path', {d: d, fill: 'none', stroke: s.color, 'stroke-width': s.width || 1.6, 'stroke-opacity': s.opacity || 1});
      el(svg, 'rect', {x: lx, y: 9, width: 14, height: s.markers ? 8 : 3, rx: s.markers ? 4 : 0, fill: s.color});
      el(svg, 'text', {x: lx + 18, y: 17, 'class': 'legend'}, s.name);
      lx += 30 + 6.1 * s.name.length;
    });
    svg.setAttribute('data-points', drawn);
    return drawn;
  }

  // A heatmap of rows × recording steps; returns the number of cells drawn.
  function heatmap(svg, o) {
    var rowH = o.rows.length > 30 ? 11 : 18, m = {l: o.labelWidth, r: 96, t: 8, b: 40};
    var W = 900, pw = W - m.l - m.r, ph = rowH * o.rows.length, H = m.t + ph + m.b;
    frame(svg, W, H);
    var n = o.cols.length, cw = pw / Math.max(n, 1), drawn = 0;
    var cells = el(svg, 'g', {});
    for (var r = 0; r < o.rows.length; ++r) {
      el(svg, 'text', {x: m.l - 6, y: m.t + r * rowH + rowH / 2 + 4, 'text-anchor': 'end', 'class': 'rowlabel'}, o.rows[r]);
      for (var c = 0; c < n; ++c) {
        var v = o.value(r, c);
        if (!finite(v)) continue;
        var rect = el(cells, 'rect', {x: (m.l + c * cw).toFixed(2), y: m.t + r * rowH, width: (cw + 0.4).toFixed(2),
                                      height: rowH - 1, fill: o.color(v)});
        tip(rect, o.tip(r, c, v));
        ++drawn;
      }
    }
    // Step labels under the columns, and epoch boundaries as white lines.
    var every = Math.max(1, Math.ceil(n / 8));
    for (var c2 = 0; c2 < n; c2 += every)
      el(svg, 'text', {x: m.l + (c2 + 0.5) * cw, y: m.t + ph + 14, 'text-anchor': 'middle'}, o.cols[c2]);
    el(svg, 'text', {x: m.l + pw / 2, y: H - 6, 'text-anchor': 'middle', 'class': 'label'},
       'training step (white: end of an epoch)');
    (data.epochs || []).forEach(function (e) {
      var k = 0;
      while (k < n && o.cols[k] < e.step) ++k;
      if (k > 0 && k < n) el(svg, 'line', {x1: m.l + k * cw, x2: m.l + k * cw, y1: m.t, y2: m.t + ph, stroke: '#fff', 'stroke-width': 1.5});
    });
    // Colour bar.
    var bx = m.l + pw + 16, bh = Math.max(ph, 60), steps = 40;
    for (var s = 0; s < steps; ++s)
      el(svg, 'rect', {x: bx, y: m.t + bh * (1 - (s + 1) / steps), width: 14, height: bh / steps + 0.5,
                       fill: o.color(o.lo + (o.hi - o.lo) * (s + 0.5) / steps)});
    o.ticks.forEach(function (t) {
      var y = m.t + bh * (1 - (t.v - o.lo) / (o.hi - o.lo));
      el(svg, 'line', {x1: bx + 14, x2: bx + 18, y1: y, y2: y, stroke: '#555'});
      el(svg, 'text', {x: bx + 21, y: y + 4}, t.label);
    });
    if (bh > ph) frame(svg, W, m.t + bh + m.b);
    svg.setAttribute('data-points', drawn);
    return drawn;
  }

  var steps = data.steps, epochs = data.epochs;
  var xmax = Math.max(steps.length ? steps[steps.length - 1] : 0, epochs.length ? epochs[epochs.length - 1].step : 0);
  function epochSeries(key) { return {xs: epochs.map(function (e) { return e.step; }), ys: epochs.map(function (e) { return e[key]; })}; }

  // ---- loss and accuracy ----
  var trainEpoch = epochSeries('train_loss'), testLoss = epochSeries('test_loss'), testAcc = epochSeries('test_accuracy');
  var lossSeries = [];
  if (steps.length) lossSeries.push({name: 'train (mean per ' + data.every + ' steps)', color: '#2563eb', xs: steps, ys: data.train_loss, opacity: 0.75, width: 1.3});
  lossSeries.push({name: 'train (epoch mean)', color: '#1e3a8a', xs: trainEpoch.xs, ys: trainEpoch.ys, markers: true, line: false});
  lossSeries.push({name: 'test', color: '#ea580c', xs: testLoss.xs, ys: testLoss.ys, markers: true});
  total += lineChart(document.getElementById('loss-chart'), {series: lossSeries, xmax: xmax, ylabel: 'cross-entropy loss'});
  var accSeries = [];
  if (steps.length) accSeries.push({name: 'train (recorded batch)', color: '#2563eb', xs: steps, ys: data.train_accuracy, opacity: 0.75, width: 1.3});
  accSeries.push({name: 'test', color: '#ea580c', xs: testAcc.xs, ys: testAcc.ys, markers: true});
  total += lineChart(document.getElementById('accuracy-chart'), {series: accSeries, xmax: xmax, ylabel: 'accuracy', percent: true, ymin: 0, ymax: 1});

  // ---- gradient flow ----
  var hm = document.getElementById('gradflow-heatmap');
  if (hm && data.weights.length && steps.length) {
    var lo = -8, hi = 1;
    data.weights.forEach(function (w) {
      w.grad.forEach(function (v) {
        if (finite(v) && v > 0) { lo = Math.min(lo, Math.floor(Math.log10(v))); hi = Math.max(hi, Math.ceil(Math.log10(v))); }
      });
    });
    var color = function (v) { return ramp(VIRIDIS, (v - lo) / (hi - lo)); };
    var logv = function (v) { return !finite(v) ? null : v > 0 ? Math.max(lo, Math.log10(v)) : lo; };
    var ticks = [];
    var stride = Math.max(1, Math.ceil((hi - lo) / 9));
    for (var d = lo; d <= hi; d += stride) ticks.push({v: d, label: '1e' + d});
    var labelWidth = 40 + 7 * Math.max.apply(null, data.weights.map(function (w) { return w.name.length; }));
    total += heatmap(hm, {
      rows: data.weights.map(function (w) { return w.name; }), cols: steps, lo: lo, hi: hi, ticks: ticks, color: color,
      labelWidth: Math.max(110, labelWidth),
      value: function (r, c) { return logv(data.weights[r].grad[c]); },
      tip: function (r, c) {
        var w = data.weights[r];
        return w.name + ' ' + w.shape + ', step ' + steps[c] + ': gradient norm ' + sci(w.grad[c]) + ', weight norm ' +
               sci(w.weight[c]) + ', update/weight ' + sci(w.update[c]);
      }
    });
    // The latest recording as a profile: one bar per weight, input layer on the left.
    var pf = document.getElementById('gradflow-profile');
    var W = 900, H = 250, m = {l: 58, r: 16, t: 12, b: 64};
    frame(pf, W, H);
    var pw = W - m.l - m.r, ph = H - m.t - m.b, nw = data.weights.length, bw = pw / nw, last = steps.length - 1, bars = 0;
    el(pf, 'rect', {x: m.l, y: m.t, width: pw, height: ph, 'class': 'plot-bg'});
    function PY(v) { return m.t + ph * (1 - (v - lo) / (hi - lo)); }
    ticks.forEach(function (t) {
      el(pf, 'line', {x1: m.l, x2: m.l + pw, y1: PY(t.v), y2: PY(t.v), 'class': 'grid'});
      el(pf, 'text', {x: m.l - 6, y: PY(t.v) + 4, 'text-anchor': 'end'}, t.label);
    });
    data.weights.forEach(function (w, i) {
      var v = logv(w.grad[last]);
      var x = m.l + i * bw + 0.5 * bw;
      el(pf, 'text', {x: x, y: m.t + ph + 14, 'text-anchor': 'end', 'class': 'rowlabel', transform: 'rotate(-35 ' + x + ' ' + (m.t + ph + 14) + ')'}, w.name);
      if (v === null) return;
      var b = el(pf, 'rect', {x: m.l + i * bw + 0.18 * bw, y: PY(v), width: 0.64 * bw, height: m.t + ph - PY(v), fill: color(v)});
      tip(b, w.name + ' at step ' + steps[last] + ': gradient norm ' + sci(w.grad[last]));
      ++bars;
    });
    el(pf, 'text', {x: 14, y: m.t + ph / 2, 'text-anchor': 'middle', 'class': 'label', transform: 'rotate(-90 14 ' + (m.t + ph / 2) + ')'},
       'gradient norm (log)');
    pf.setAttribute('data-points', bars);
    total += bars;
  }

  // ---- activations ----
  var am = document.getElementById('activation-heatmap');
  if (am && data.activations.length && steps.length) {
    total += heatmap(am, {
      rows: data.activations.map(function (a) { return a.layer + ' ' + a.kind; }), cols: steps, lo: 0, hi: 1,
      ticks: [0, 0.25, 0.5, 0.75, 1].map(function (v) { return {v: v, label: Math.round(v * 100) + '%'}; }),
      color: function (v) { return ramp(REDS, v); }, labelWidth: 110,
      value: function (r, c) { return data.activations[r].inactive[c]; },
      tip: function (r, c) {
        var a = data.activations[r];
        return a.layer + ' ' + a.kind + ', step ' + steps[c] + ': ' + (100 * a.inactive[c]).toFixed(1) +
               (a.kind === 'ReLU' ? '% dead units' : '% saturated outputs') + ', mean local derivative ' +
               (finite(a.derivative[c]) ? a.derivative[c].toFixed(3) : '-');
      }
    });
  }

  document.getElementById('plotted-points').textContent = String(total);
  document.body.setAttribute('data-rendered', 'true');
})();
)JS";

}  // namespace chaingrad::report::detail
