/* Tokens view: every token shaded by probability or entropy; hover or click one for its
 * alternatives (most likely first) and, where recorded, a link to its attention and logit lens.
 *
 * Events: M (a reply gets its own box), K (tokens). See workbench.js for the rules.
 */
(function (TF) {
  "use strict";
  if (!TF || !TF.defineView) return;
  var U = TF.util;
  var el = U.el, str = U.str, num = U.num, visible = U.visible, fmt = U.fmt;

  function Tokens(wb, box) {
    this.wb = wb;
    this.el = box;
    this.mode = "probability";
    var self = this;
    var ctl = el("div", "tf-ctl");
    ctl.appendChild(el("span", "tf-ctl-label", "Shade by"));
    ["probability", "entropy"].forEach(function (m) {
      var b = el("button", "tf-mode", m);
      b.type = "button";
      b.dataset.mode = m;
      b.addEventListener("click", function () {
        self.setMode(m);
      });
      ctl.appendChild(b);
    });
    box.appendChild(ctl);
    this.list = el("div", "tf-toklist");
    box.appendChild(this.list);
    var tokOf = function (e) {
      return e.target.closest && e.target.closest(".tf-tok");
    };
    this.list.addEventListener("mouseover", function (e) {
      var t = tokOf(e);
      if (t && !self.pinned) self.popover(t, false);
    });
    this.list.addEventListener("mouseleave", function () {
      if (!self.pinned) self.hidePop();
    });
    this.list.addEventListener("click", function (e) {
      var t = tokOf(e);
      if (t) self.popover(t, true);
    });
    this.list.addEventListener("keydown", function (e) {
      var t = tokOf(e);
      if (t && (e.key === "Enter" || e.key === " ")) {
        e.preventDefault();
        self.popover(t, true);
      } else if (e.key === "Escape") self.hidePop(true);
    });
    // The popover is positioned against the whole workbench, so it hangs off the host.
    this.pop = el("div", "tf-pop");
    this.pop.setAttribute("role", "tooltip");
    this.pop.hidden = true;
    this.pop.addEventListener("click", function (e) {
      var b = e.target.closest && e.target.closest("button[data-act]");
      if (!b) return;
      if (b.dataset.act === "close") self.hidePop(true);
      if (b.dataset.act === "attention") {
        var i = parseInt(b.dataset.tok, 10);
        self.hidePop(true);
        var att = wb.views.attention;
        wb.show("attention");
        if (att) att.open(i);
      }
    });
    wb.host.appendChild(this.pop);
    document.addEventListener("keydown", function (e) {
      if (e.key === "Escape") self.hidePop(true);
    });
    wb.on("M", function (e) {
      self.cur = null;
      if (str(e[2]) === "assistant") {
        self.cur = el("div", "tf-tokmsg");
        self.cur.dataset.msg = String(e[1]);
        self.list.appendChild(self.cur);
      }
    });
    wb.on("K", function (e, rec) {
      self.token(rec);
    });
    this.setMode("probability");
  }

  Tokens.prototype.clear = function () {
    U.empty(this.list);
    this.tokens = [];
    this.cur = null;
    this.hidePop(true);
  };

  Tokens.prototype.hiddenView = function () {
    this.hidePop(true);
  };

  Tokens.prototype.token = function (rec) {
    this.tokens[rec.i] = rec;
    var s = el("span", "tf-tok", visible(rec.text));
    s.dataset.tokenIndex = String(rec.i);
    s.tabIndex = 0;
    s.style.borderBottomColor = this.wb.colorOf(rec.voice);
    this.shade(s, rec);
    (this.cur || this.list).appendChild(s);
  };

  Tokens.prototype.shade = function (s, rec) {
    var a = 0;
    if (this.mode === "probability") {
      if (rec.lp != null) a = (1 - Math.exp(rec.lp)) * 0.85;
      s.style.backgroundColor = U.rgba("#E8590C", a);
    } else {
      if (rec.ent != null) a = Math.min(1, rec.ent / 4) * 0.85;
      s.style.backgroundColor = U.rgba("#5F3DC4", a);
    }
    s.dataset.shade = a.toFixed(3);
  };

  Tokens.prototype.setMode = function (mode) {
    this.mode = mode === "entropy" ? "entropy" : "probability";
    var self = this;
    this.el.querySelectorAll(".tf-mode").forEach(function (b) {
      b.setAttribute("aria-pressed", b.dataset.mode === self.mode ? "true" : "false");
    });
    this.list.querySelectorAll(".tf-tok").forEach(function (s) {
      var rec = self.tokens && self.tokens[parseInt(s.dataset.tokenIndex, 10)];
      if (rec) self.shade(s, rec);
    });
  };

  Tokens.prototype.hidePop = function (unpin) {
    if (unpin) this.pinned = false;
    if (this.pop) this.pop.hidden = true;
  };

  Tokens.prototype.popover = function (span, pin) {
    var rec = this.tokens[parseInt(span.dataset.tokenIndex, 10)];
    if (!rec) return;
    this.pinned = !!pin;
    var p = this.pop;
    U.empty(p);
    var head = el("div", "tf-pop-head");
    head.appendChild(el("code", "tf-pop-tok", visible(rec.text) || "\u2205"));
    var vn = el("span", "tf-pop-voice", rec.voice);
    vn.style.borderColor = this.wb.colorOf(rec.voice);
    head.appendChild(vn);
    if (pin) {
      var x = el("button", "tf-pop-x", "×");
      x.type = "button";
      x.dataset.act = "close";
      x.setAttribute("aria-label", "close");
      head.appendChild(x);
    }
    p.appendChild(head);
    var facts = "#" + rec.i + " · p " + (rec.lp == null ? "–" : Math.exp(rec.lp).toFixed(3)) +
      " · logprob " + fmt(rec.lp) + " · entropy " + fmt(rec.ent) + " nats";
    p.appendChild(el("div", "tf-pop-facts", facts));
    if (rec.alts.length) {
      var t = el("table", "tf-alts");
      var chosen = false;
      // Most likely first, whatever order the recording kept (unknown logprobs last).
      var alts = rec.alts.filter(Array.isArray).slice().sort(function (x, y) {
        var a = num(x[1]), b = num(y[1]);
        return (b == null ? -Infinity : b) - (a == null ? -Infinity : a);
      });
      for (var k = 0; k < alts.length; k++) {
        var text = str(alts[k][0]);
        var lp = num(alts[k][1]);
        var pr = lp == null ? null : Math.exp(lp);
        var tr = el("tr", "tf-alt");
        if (!chosen && text === rec.text) {
          tr.classList.add("tf-chosen");
          chosen = true;
        }
        tr.appendChild(el("td", "tf-alt-text", text === "" ? "<empty>" : visible(text)));
        var bar = el("td", "tf-alt-bar");
        var fill = el("span", "tf-fill");
        fill.style.width = (pr == null ? 0 : Math.round(pr * 100)) + "%";
        bar.appendChild(fill);
        tr.appendChild(bar);
        tr.appendChild(el("td", "tf-alt-p", pr == null ? "–" : (pr * 100).toFixed(1) + "%"));
        t.appendChild(tr);
      }
      p.appendChild(t);
      // The loom (loom.js) adds "branch here" to every alternative.
      if (this.wb.loom) this.wb.loom.popover(p, t, alts, rec, span);
    } else {
      p.appendChild(el("div", "tf-pop-none", "no alternatives recorded"));
    }
    if (rec.att || rec.lens) {
      var ab = el("button", "tf-pop-att", rec.att ? "Attention →" : "Logit lens →");
      ab.type = "button";
      ab.dataset.act = "attention";
      ab.dataset.tok = String(rec.i);
      p.appendChild(ab);
    }
    p.hidden = false;
    var r = span.getBoundingClientRect();
    var hr = this.wb.host.getBoundingClientRect();
    p.style.left = Math.max(0, Math.min(r.left - hr.left, hr.width - 320)) + "px";
    p.style.top = r.bottom - hr.top + 4 + "px";
  };

  TF.defineView({
    id: "tokens",
    label: "Tokens",
    create: function (wb, box) {
      return new Tokens(wb, box);
    },
  });
})(window.thoughtform);
