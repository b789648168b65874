/* Steering in the workbench (an add-on of workbench.js; loaded after it, before the views).
 *
 *   Legend: each declared voice's chip gets two buttons, [data-action=next] (the next reply, or
 *   the next block of a streaming one, opens with this voice) and [data-action=mute] (toggle).
 *   Clicks go to the server function tf_steer(session, action, voice), which answers with the
 *   session's state {muted: [...], next: name|null}; the "I" event carries the same state, so
 *   the chips show it after a reload.
 *   Voice choices: each "W" event (who speaks next at a boundary; see thoughtform/ui/stream.py)
 *   becomes a small button at that boundary of the reply that opens a bar chart of the model's
 *   probability of each voice opening there.
 *
 * Voice names and probabilities are model or user data: textContent / dataset only, colours
 * through safeColor, numbers through num (the rules in workbench.js).
 */
(function (TF) {
  "use strict";
  if (!TF || !TF.addon || !TF.util) return;
  var U = TF.util;
  var el = U.el, str = U.str, num = U.num;

  function Steer(wb) {
    this.wb = wb;
    this.muted = new Set();
    this.next = null;
    this.declared = [];
    this.chips = new Map(); // voice -> {wrap, leg, next, mute}
    var self = this;
    wb.on("R", function () {
      self.chips = new Map();
      self.declared = [];
    });
    wb.on("V", function (e) {
      self.decorate(e[1]);
    });
    wb.on("I", function (e) {
      var i = e[1] && typeof e[1] === "object" ? e[1] : {};
      self.setState(i.muted, i.next_voice);
    });
    wb.on("O", function (e) {
      // The pending "next" voice has opened its block in a live reply: it is used up.
      var chat = wb.views.chat;
      var m = chat && chat.msg;
      if (self.next && m && m.role === "assistant" && m.status === "streaming") {
        self.next = null;
        self.refresh();
      }
    });
    wb.on("W", function (e) {
      self.choice(e);
    });
  }

  // -- legend ------------------------------------------------------------------------------

  Steer.prototype.decorate = function (rows) {
    var wb = this.wb;
    var self = this;
    // Wrappers left empty by a legend chip drawn again (setVoices) go first.
    Array.prototype.slice.call(wb.legend.querySelectorAll(".tf-legchip")).forEach(function (w) {
      if (!w.querySelector(".tf-leg")) w.parentNode.removeChild(w);
    });
    (Array.isArray(rows) ? rows : []).forEach(function (r) {
      if (!Array.isArray(r)) return;
      var name = str(r[0]);
      var v = wb.voices.get(name);
      if (!v || !v.button || !v.button.parentNode) return;
      if (self.declared.indexOf(name) < 0) self.declared.push(name);
      var leg = v.button;
      var wrap = leg.parentNode.classList.contains("tf-legchip") ? leg.parentNode : null;
      if (!wrap) {
        wrap = el("span", "tf-legchip");
        wrap.dataset.voice = name;
        leg.parentNode.insertBefore(wrap, leg);
        wrap.appendChild(leg);
      }
      Array.prototype.slice.call(wrap.querySelectorAll(".tf-steer")).forEach(function (b) {
        wrap.removeChild(b);
      });
      var nx = self.button("next", name, "\u25b8", "Make " + name + " speak next (the next reply, or the next block while a reply streams)");
      var mu = self.button("mute", name, "\u2298", "Mute " + name + " (the model cannot open this voice)");
      wrap.appendChild(nx);
      wrap.appendChild(mu);
      self.chips.set(name, { wrap: wrap, leg: leg, next: nx, mute: mu });
    });
    this.refresh();
  };

  Steer.prototype.button = function (action, name, glyph, label) {
    var self = this;
    var b = el("button", "tf-steer tf-steer-" + action, glyph);
    b.type = "button";
    b.dataset.action = action;
    b.dataset.voice = name;
    b.title = label;
    b.setAttribute("aria-label", label);
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", function (ev) {
      ev.stopPropagation();
      self.send(action, name);
    });
    return b;
  };

  Steer.prototype.send = function (action, name) {
    var self = this;
    var server = this.wb.server;
    if (!server || !server.tf_steer || !this.wb.sid) return;
    var sid = this.wb.sid;
    this.wb.host.dataset.steerBusy = "1";
    server
      .tf_steer(sid, action, name)
      .then(function (res) {
        if (self.wb.sid !== sid || !res || typeof res !== "object") return;
        if (res.ok) self.setState(res.muted, res.next);
        else if (res.error) self.wb.host.dataset.steerError = str(res.error).slice(0, 300);
      })
      .catch(function (e) {
        console.error("thoughtform steer:", e);
      })
      .then(function () {
        delete self.wb.host.dataset.steerBusy;
      });
  };

  Steer.prototype.setState = function (muted, next) {
    this.muted = new Set((Array.isArray(muted) ? muted : []).filter(function (x) { return typeof x === "string"; }));
    this.next = typeof next === "string" && next ? next : null;
    this.refresh();
  };

  Steer.prototype.refresh = function () {
    var self = this;
    this.chips.forEach(function (c, name) {
      var muted = self.muted.has(name);
      var next = self.next === name;
      c.wrap.classList.toggle("tf-muted", muted);
      c.leg.classList.toggle("tf-muted", muted);
      c.wrap.classList.toggle("tf-next", next);
      c.mute.setAttribute("aria-pressed", muted ? "true" : "false");
      c.next.setAttribute("aria-pressed", next ? "true" : "false");
    });
  };

  // -- voice choices -----------------------------------------------------------------------

  function pct(p) {
    var v = num(p);
    return v == null ? "–" : (v * 100).toFixed(1) + "%";
  }

  /** The block of the current message that opens at or after global token ``tok``. */
  Steer.prototype.blockAt = function (tok) {
    var chat = this.wb.views.chat;
    if (!chat || !chat.msg || tok == null) return null;
    var best = null;
    var arr = chat.blockStarts || [];
    for (var i = 0; i < arr.length; i++) {
      var b = arr[i][1];
      if (b.msg !== chat.msg || arr[i][0] < tok) continue;
      if (!best || arr[i][0] < best[0]) best = arr[i];
    }
    return best ? best[1] : null;
  };

  Steer.prototype.choice = function (e) {
    var chat = this.wb.views.chat;
    var m = chat && chat.msg;
    if (!m) return;
    var tok = num(e[1]);
    var pairs = (Array.isArray(e[2]) ? e[2] : []).filter(function (p) {
      return Array.isArray(p) && num(p[1]) != null;
    });
    var chosen = typeof e[3] === "string" ? e[3] : null;
    var forced = !!e[4];
    var approx = !!e[5];
    pairs.sort(function (a, b) { return b[1] - a[1]; });
    var box = el("div", "tf-choice");
    if (tok != null) box.dataset.token = String(tok);
    box.dataset.chosen = chosen || "";
    var p0 = null;
    pairs.forEach(function (p) { if (str(p[0]) === chosen) p0 = p[1]; });
    var label = chosen ? "next: " + chosen + (p0 != null ? " " + pct(p0) : "") : "who next? (reply ended)";
    if (forced) label += " (forced)";
    var btn = el("button", "tf-choice-btn", label);
    btn.type = "button";
    btn.setAttribute("aria-expanded", "false");
    btn.title = "The model's probability of each voice opening here";
    var chart = this.chart(pairs, chosen, forced, approx);
    chart.hidden = true;
    btn.addEventListener("click", function () {
      chart.hidden = !chart.hidden;
      btn.setAttribute("aria-expanded", chart.hidden ? "false" : "true");
    });
    box.appendChild(btn);
    box.appendChild(chart);
    var b = this.blockAt(tok);
    if (b && b.el.parentNode === m.el) m.el.insertBefore(box, b.el);
    else m.el.appendChild(box);
  };

  Steer.prototype.chart = function (pairs, chosen, forced, approx) {
    var wb = this.wb;
    var c = el("div", "tf-choice-chart");
    c.setAttribute("role", "group");
    c.setAttribute("aria-label", "Who speaks next");
    var total = 0;
    pairs.forEach(function (p) {
      var v = Math.max(0, Math.min(1, p[1]));
      total += v;
      var row = el("div", "tf-choice-row");
      row.dataset.voice = str(p[0]);
      if (str(p[0]) === chosen) row.classList.add("tf-chosen");
      row.appendChild(el("span", "tf-choice-name", str(p[0])));
      var track = el("span", "tf-choice-track");
      var bar = el("span", "tf-choice-bar");
      bar.style.width = (v * 100).toFixed(2) + "%";
      bar.style.backgroundColor = U.safeColor(wb.colorOf(p[0]));
      track.appendChild(bar);
      row.appendChild(track);
      row.appendChild(el("span", "tf-choice-val", pct(v)));
      c.appendChild(row);
    });
    var notes = [];
    notes.push("other text or the end: " + pct(Math.max(0, 1 - total)));
    if (forced) notes.push("the voice was forced (next)");
    if (approx) notes.push("approximate (from the server's top tokens)");
    c.appendChild(el("p", "tf-choice-note", notes.join(" · ")));
    return c;
  };

  TF.addon(function (wb) {
    wb.steer = new Steer(wb);
  });
})(window.thoughtform);
