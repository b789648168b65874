/* Stats view: per-voice tokens, mean logprob, perplexity and mean entropy over the session, and
 * the voice transition matrix (observed), next to the model's own one (from its who-speaks-next
 * probabilities at each boundary, when the backend scores voices).
 *
 * Events: S (sent after each reply and with every reset). See workbench.js for the rules.
 */
(function (TF) {
  "use strict";
  if (!TF || !TF.defineView) return;
  var U = TF.util;
  var el = U.el, str = U.str, num = U.num, fmt = U.fmt;

  function Stats(wb, box) {
    this.wb = wb;
    this.el = box;
    var self = this;
    wb.on("S", function (e) {
      self.render(e[1], e[2], e[3]);
    });
  }

  Stats.prototype.clear = function () {
    U.empty(this.el);
    this.el.appendChild(el("p", "tf-empty", "No tokens yet."));
  };

  Stats.prototype.render = function (rows, tm, mm) {
    var s = this.el;
    U.empty(s);
    if (!Array.isArray(rows) || !rows.length) {
      s.appendChild(el("p", "tf-empty", "No tokens yet."));
      return;
    }
    var t = el("table", "tf-stattab");
    var hr = el("tr");
    ["voice", "tokens", "mean logprob", "perplexity", "mean entropy"].forEach(function (h) {
      hr.appendChild(el("th", null, h));
    });
    t.appendChild(hr);
    var wb = this.wb;
    rows.forEach(function (r) {
      if (!Array.isArray(r)) return;
      var tr = el("tr");
      tr.dataset.voice = str(r[0]);
      var td = el("td", "tf-stat-voice");
      var sw = el("span", "tf-sw");
      sw.style.backgroundColor = wb.colorOf(r[0]);
      td.appendChild(sw);
      td.appendChild(el("span", "tf-vname", str(r[0])));
      tr.appendChild(td);
      tr.appendChild(el("td", "tf-num", String(num(r[1]) == null ? "–" : r[1])));
      tr.appendChild(el("td", "tf-num", fmt(r[2])));
      tr.appendChild(el("td", "tf-num", fmt(r[3], 2)));
      tr.appendChild(el("td", "tf-num", fmt(r[4])));
      t.appendChild(tr);
    });
    s.appendChild(el("h4", null, "Per voice"));
    s.appendChild(t);
    if (!Array.isArray(tm) || !Array.isArray(tm[0]) || !tm[0].length) return;
    var pair = el("div", "tf-models");
    pair.appendChild(matrix("Voice transitions (row \u2192 column)", tm, "tf-matrix-observed", function (x) {
      return x ? String(x) : "";
    }));
    if (Array.isArray(mm) && Array.isArray(mm[0]) && mm[0].length) {
      pair.appendChild(matrix("The model's own transitions (mean probability)", mm, "tf-matrix-model", function (x) {
        return x ? x.toFixed(2) : "";
      }));
    }
    s.appendChild(pair);
  };

  /** One transition matrix as a grid: [order, rows], cells shaded by value, ``show`` as text. */
  function matrix(title, tm, cls, show) {
    var order = tm[0];
    var mat = Array.isArray(tm[1]) ? tm[1] : [];
    var box = el("div", cls);
    var max = 0;
    mat.forEach(function (row) {
      (Array.isArray(row) ? row : []).forEach(function (x) {
        if (num(x) != null && x > max) max = x;
      });
    });
    box.appendChild(el("h4", null, title));
    var g = el("div", "tf-matrix");
    g.style.gridTemplateColumns = "minmax(6em,auto) repeat(" + order.length + ", 2.6em)";
    g.appendChild(el("span", "tf-mx-corner", "from \\ to"));
    order.forEach(function (n) {
      var h = el("span", "tf-mx-head", str(n));
      h.title = str(n);
      g.appendChild(h);
    });
    order.forEach(function (n, i) {
      g.appendChild(el("span", "tf-mx-row", str(n)));
      order.forEach(function (m, j) {
        var x = num(mat[i] && mat[i][j]) || 0;
        var c = el("span", "tf-mx-cell", show(x));
        c.style.backgroundColor = U.rgba("#3366DD", max ? (x / max) * 0.8 : 0);
        c.title = str(n) + " → " + str(m) + ": " + show(x);
        c.dataset.from = str(n);
        c.dataset.to = str(m);
        g.appendChild(c);
      });
    });
    var wrap = el("div", "tf-scroll-x");
    wrap.appendChild(g);
    box.appendChild(wrap);
    return box;
  }

  TF.defineView({
    id: "stats",
    label: "Stats",
    create: function (wb, box) {
      return new Stats(wb, box);
    },
  });
})(window.thoughtform);
