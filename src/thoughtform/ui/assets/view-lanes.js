/* Lanes view: one lane per voice on a token axis shared by the whole session; a click on a span
 * scrolls the chat to its block. Per token the work is one width change (or one new span).
 *
 * Where a voice vector was in force (K's 9th item, [[voice, strength], ...]) a hatched band
 * over the lane marks those tokens, titled e.g. "Doubt vector ×1.5" (names only as text).
 *
 * Events: M (a reply's start marks the axis), K (tokens). See workbench.js for the rules.
 */
(function (TF) {
  "use strict";
  if (!TF || !TF.defineView) return;
  var U = TF.util;
  var el = U.el;

  function Lanes(wb, box) {
    this.wb = wb;
    this.el = box;
    var self = this;
    var ctl = el("div", "tf-ctl");
    ctl.appendChild(el("span", "tf-ctl-label", "Zoom"));
    this.zoomEl = el("input", "tf-zoom");
    this.zoomEl.type = "range";
    this.zoomEl.min = "1";
    this.zoomEl.max = "12";
    this.zoomEl.value = "3";
    this.zoomEl.setAttribute("aria-label", "pixels per token");
    this.zoomEl.addEventListener("input", function () {
      self.setZoom(parseInt(self.zoomEl.value, 10) || 3);
    });
    ctl.appendChild(this.zoomEl);
    this.info = el("span", "tf-ctl-info");
    ctl.appendChild(this.info);
    box.appendChild(ctl);
    this.wrap = el("div", "tf-lanewrap");
    box.appendChild(this.wrap);
    wb.on("M", function (e) {
      self.msgId = e[1];
      if (U.str(e[2]) === "assistant") self.mark(U.num(e[4]) || 0);
    });
    wb.on("K", function (e, rec) {
      self.token(rec);
      if (rec) self.vector(rec, vectorOf(e[8]));
    });
  }

  /* The vector in force at a token: {key, title} or null (malformed items are dropped). */
  function vectorOf(x) {
    if (!Array.isArray(x)) return null;
    var parts = [];
    for (var i = 0; i < x.length && i < 8; i++) {
      var p = x[i];
      if (!Array.isArray(p) || p.length < 2) continue;
      var name = U.str(p[0]).slice(0, 64);
      var s = U.num(p[1]);
      if (!name || s == null || !isFinite(s) || s === 0) continue;
      parts.push(name + " vector \u00d7" + String(Math.round(s * 100) / 100));
    }
    if (!parts.length) return null;
    var title = parts.join(", ");
    return { key: title, title: title };
  }

  Lanes.prototype.clear = function () {
    U.empty(this.wrap);
    this.lanes = new Map();
    this.order = [];
    this.msgId = null;
    this.px = parseInt(this.zoomEl.value, 10) || 3;
    this.width = 0;
    this.axis = el("div", "tf-axis");
    this.wrap.appendChild(this.axis);
    this.ticks = 0;
    this.info.textContent = "";
  };

  Lanes.prototype.lane = function (name) {
    var ln = this.lanes.get(name);
    if (ln) return ln;
    var v = this.wb.voice(name, U.MAIN);
    var row = el("div", "tf-lane");
    row.dataset.voice = name;
    var lab = el("div", "tf-lane-label");
    var sw = el("span", "tf-sw");
    sw.style.backgroundColor = v.color;
    lab.appendChild(sw);
    lab.appendChild(el("span", "tf-vname", name));
    row.appendChild(lab);
    var track = el("div", "tf-track");
    row.appendChild(track);
    if (this.wb.hidden.has(name)) row.classList.add("tf-hidden");
    ln = { row: row, track: track, last: null, lane: v.lane, color: v.color };
    // Keep lanes in the voice set's lane order (unknown voices after, as they appear).
    var before = null;
    for (var i = 0; i < this.order.length; i++) {
      if (this.order[i].lane > ln.lane) {
        before = this.order[i];
        this.order.splice(i, 0, ln);
        break;
      }
    }
    if (before) this.wrap.insertBefore(row, before.row);
    else {
      this.order.push(ln);
      this.wrap.appendChild(row);
    }
    this.lanes.set(name, ln);
    return ln;
  };

  Lanes.prototype.token = function (rec) {
    var ln = this.lane(rec.voice);
    var last = ln.last;
    var px = this.px;
    if (last && last.end === rec.i - 1 && last.msg === this.msgId) {
      last.end = rec.i;
      last.el.dataset.end = String(rec.i);
      last.el.style.width = (last.end - last.start + 1) * px + "px";
    } else {
      var s = el("div", "tf-span");
      s.style.left = rec.i * px + "px";
      s.style.width = px + "px";
      s.style.backgroundColor = ln.color;
      s.dataset.voice = rec.voice;
      s.dataset.start = String(rec.i);
      s.dataset.end = String(rec.i);
      ln.track.appendChild(s);
      last = ln.last = { el: s, start: rec.i, end: rec.i, msg: this.msgId };
      var wb = this.wb;
      var voice = rec.voice;
      s.addEventListener("click", function () {
        if (wb.views.chat) wb.views.chat.reveal(voice, parseInt(s.dataset.start, 10));
      });
    }
    last.el.title = rec.voice + " · tokens " + last.start + "–" + last.end;
    var w = (rec.i + 1) * px;
    if (w > this.width) {
      this.width = w + 200 * px;
      this.wrap.style.setProperty("--tf-w", this.width + "px");
    }
    while (this.ticks * 100 <= rec.i) {
      var tk = el("span", "tf-tick", String(this.ticks * 100));
      tk.style.left = this.ticks * 100 * px + "px";
      tk.dataset.at = String(this.ticks * 100);
      this.axis.appendChild(tk);
      this.ticks++;
    }
    this.info.textContent = this.wb.nTok + " tokens";
  };

  Lanes.prototype.vector = function (rec, vec) {
    var ln = this.lanes.get(rec.voice);
    if (!ln) return;
    if (!vec) {
      ln.vec = null;
      return;
    }
    var px = this.px;
    var last = ln.vec;
    if (last && last.key === vec.key && last.end === rec.i - 1 && last.msg === this.msgId) {
      last.end = rec.i;
      last.el.dataset.end = String(rec.i);
      last.el.style.width = (last.end - last.start + 1) * px + "px";
    } else {
      var b = el("div", "tf-vec");
      b.style.left = rec.i * px + "px";
      b.style.width = px + "px";
      b.dataset.voice = rec.voice;
      b.dataset.vector = vec.key;
      b.dataset.start = String(rec.i);
      b.dataset.end = String(rec.i);
      ln.track.appendChild(b);
      last = ln.vec = { el: b, key: vec.key, start: rec.i, end: rec.i, msg: this.msgId };
      var wb = this.wb;
      var voice = rec.voice;
      b.addEventListener("click", function () {
        if (wb.views.chat) wb.views.chat.reveal(voice, parseInt(b.dataset.start, 10));
      });
    }
    last.el.title = vec.title + " · tokens " + last.start + "–" + last.end;
  };

  Lanes.prototype.mark = function (at) {
    var mk = el("span", "tf-msgmark");
    mk.style.left = at * this.px + "px";
    mk.dataset.at = String(at);
    this.axis.appendChild(mk);
  };

  Lanes.prototype.setZoom = function (px) {
    this.px = px;
    this.wrap.querySelectorAll(".tf-span, .tf-vec").forEach(function (s) {
      var a = parseInt(s.dataset.start, 10);
      var b = parseInt(s.dataset.end, 10);
      s.style.left = a * px + "px";
      s.style.width = (b - a + 1) * px + "px";
    });
    this.axis.querySelectorAll("[data-at]").forEach(function (t) {
      t.style.left = parseInt(t.dataset.at, 10) * px + "px";
    });
    this.width = (this.wb.nTok + 200) * px;
    this.wrap.style.setProperty("--tf-w", this.width + "px");
  };

  Lanes.prototype.setHidden = function (name, hide) {
    var ln = this.lanes.get(name);
    if (ln) ln.row.classList.toggle("tf-hidden", hide);
  };

  TF.defineView({
    id: "lanes",
    label: "Lanes",
    create: function (wb, box) {
      return new Lanes(wb, box);
    },
  });
})(window.thoughtform);
