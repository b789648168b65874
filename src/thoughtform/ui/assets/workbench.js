/* thoughtform workbench renderer.
 *
 * Receives small JSON payloads (see thoughtform/ui/stream.py) and appends DOM nodes. Model text,
 * voice names and alternatives only ever reach the page through textContent / setAttribute /
 * dataset; colours only after matching ^#[0-9A-Fa-f]{6}$; numbers only after isFinite. Nothing
 * here uses innerHTML, insertAdjacentHTML or document.write.
 *
 * Per token the work is constant: one text node in the chat, one span in the tokens view, and
 * one width change in the lanes view; scrolling is coalesced into one animation frame.
 */
(function () {
  "use strict";
  if (window.thoughtform && window.thoughtform.version === 1) return;

  var HEX = /^#[0-9A-Fa-f]{6}$/;
  var MAIN = "#777777";
  var LONG_LINE = 1500;
  var VIEWS = [
    ["chat", "Chat"],
    ["lanes", "Lanes"],
    ["tokens", "Tokens"],
    ["stats", "Stats"],
    ["attention", "Attention"],
  ];

  function safeColor(c) {
    return typeof c === "string" && HEX.test(c) ? c : MAIN;
  }
  function num(x) {
    return typeof x === "number" && isFinite(x) ? x : null;
  }
  function str(x) {
    return typeof x === "string" ? x : x == null ? "" : String(x);
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }
  function rgba(hex, a) {
    var c = safeColor(hex);
    var r = parseInt(c.slice(1, 3), 16);
    var g = parseInt(c.slice(3, 5), 16);
    var b = parseInt(c.slice(5, 7), 16);
    return "rgba(" + r + "," + g + "," + b + "," + Math.max(0, Math.min(1, a)).toFixed(3) + ")";
  }
  // Whitespace and control characters made visible in the tokens view and popovers.
  function visible(t) {
    return str(t).replace(/[\u0000-\u001f\u007f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]/g, function (ch) {
      if (ch === "\n") return "\u21b5\n";
      if (ch === "\t") return "\u21e5";
      if (ch === " ") return " ";
      var h = ch.charCodeAt(0).toString(16).toUpperCase();
      return "\u2039U+" + ("0000" + h).slice(-4) + "\u203a";
    });
  }
  function fmt(x, d) {
    var v = num(x);
    return v == null ? "–" : v.toFixed(d == null ? 3 : d);
  }

  function Workbench(host, server) {
    this.host = host;
    this.server = server;
    this.chain = Promise.resolve();
    this.lastNonce = 0;
    this.runs = Object.create(null);
    this.mode = "probability";
    this.view = "chat";
    this.hidden = new Set();
    this.stats = { tokens: 0, payloads: 0, bytes: 0, firstAt: null, lastAt: null, log: null };
    this.build();
    this.clear();
  }

  Workbench.prototype.build = function () {
    var h = this.host;
    while (h.firstChild) h.removeChild(h.firstChild);
    var bar = el("div", "tf-bar");
    this.legend = el("div", "tf-legend");
    this.legend.setAttribute("role", "group");
    this.legend.setAttribute("aria-label", "Voices (click to hide or show)");
    this.tabs = el("div", "tf-views");
    this.tabs.setAttribute("role", "tablist");
    var self = this;
    this.viewEls = {};
    this.tabEls = {};
    VIEWS.forEach(function (v) {
      var b = el("button", "tf-viewtab", v[1]);
      b.type = "button";
      b.dataset.view = v[0];
      b.setAttribute("role", "tab");
      b.addEventListener("click", function () {
        self.show(v[0]);
      });
      self.tabs.appendChild(b);
      self.tabEls[v[0]] = b;
    });
    bar.appendChild(this.legend);
    bar.appendChild(this.tabs);
    h.appendChild(bar);

    // Chat
    this.chatEl = el("div", "tf-view tf-chat");
    this.chatEl.setAttribute("aria-live", "off");
    this.stick = true;
    this.chatEl.addEventListener("scroll", function () {
      var c = self.chatEl;
      self.stick = c.scrollHeight - c.scrollTop - c.clientHeight < 48;
    });
    // Lanes
    this.lanesEl = el("div", "tf-view tf-lanes");
    var lctl = el("div", "tf-ctl");
    lctl.appendChild(el("span", "tf-ctl-label", "Zoom"));
    this.zoomEl = el("input", "tf-zoom");
    this.zoomEl.type = "range";
    this.zoomEl.min = "1";
    this.zoomEl.max = "12";
    this.zoomEl.value = "3";
    this.zoomEl.setAttribute("aria-label", "pixels per token");
    this.zoomEl.addEventListener("input", function () {
      self.setZoom(parseInt(self.zoomEl.value, 10) || 3);
    });
    lctl.appendChild(this.zoomEl);
    this.lanesInfo = el("span", "tf-ctl-info");
    lctl.appendChild(this.lanesInfo);
    this.lanesEl.appendChild(lctl);
    this.laneWrap = el("div", "tf-lanewrap");
    this.lanesEl.appendChild(this.laneWrap);
    // Tokens
    this.tokensEl = el("div", "tf-view tf-tokens");
    var tctl = el("div", "tf-ctl");
    tctl.appendChild(el("span", "tf-ctl-label", "Shade by"));
    ["probability", "entropy"].forEach(function (m) {
      var b = el("button", "tf-mode", m);
      b.type = "button";
      b.dataset.mode = m;
      b.addEventListener("click", function () {
        self.setMode(m);
      });
      tctl.appendChild(b);
    });
    this.tokensEl.appendChild(tctl);
    this.tokList = el("div", "tf-toklist");
    this.tokensEl.appendChild(this.tokList);
    this.tokList.addEventListener("mouseover", function (e) {
      var t = e.target.closest && e.target.closest(".tf-tok");
      if (t && !self.pinned) self.popover(t, false);
    });
    this.tokList.addEventListener("mouseleave", function () {
      if (!self.pinned) self.hidePop();
    });
    this.tokList.addEventListener("click", function (e) {
      var t = e.target.closest && e.target.closest(".tf-tok");
      if (t) self.popover(t, true);
    });
    this.tokList.addEventListener("keydown", function (e) {
      var t = e.target.closest && e.target.closest(".tf-tok");
      if (t && (e.key === "Enter" || e.key === " ")) {
        e.preventDefault();
        self.popover(t, true);
      } else if (e.key === "Escape") self.hidePop(true);
    });
    // Stats
    this.statsEl = el("div", "tf-view tf-stats");
    // Attention
    this.attnEl = el("div", "tf-view tf-attn");
    var actl = el("div", "tf-ctl");
    actl.appendChild(el("span", "tf-ctl-label", "Token"));
    this.attnTok = el("input", "tf-attn-tok");
    this.attnTok.type = "number";
    this.attnTok.min = "0";
    this.attnTok.value = "0";
    this.attnTok.setAttribute("aria-label", "token index");
    this.attnTok.addEventListener("change", function () {
      self.loadAttention(parseInt(self.attnTok.value, 10) || 0);
    });
    actl.appendChild(this.attnTok);
    actl.appendChild(el("span", "tf-ctl-label", "Layer"));
    this.attnLayer = el("input", "tf-attn-layer");
    this.attnLayer.type = "range";
    this.attnLayer.min = "0";
    this.attnLayer.max = "0";
    this.attnLayer.value = "0";
    this.attnLayer.setAttribute("aria-label", "layer");
    this.attnLayer.addEventListener("input", function () {
      self.renderAttention();
    });
    actl.appendChild(this.attnLayer);
    this.attnLayerLabel = el("span", "tf-ctl-info", "");
    actl.appendChild(this.attnLayerLabel);
    this.attnEl.appendChild(actl);
    this.attnBody = el("div", "tf-attn-body", "Pick a token (in the Tokens view, or by number).");
    this.attnEl.appendChild(this.attnBody);

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
        self.show("attention");
        self.attnTok.value = String(i);
        self.loadAttention(i);
      }
    });
    document.addEventListener("keydown", function (e) {
      if (e.key === "Escape") self.hidePop(true);
    });

    [this.chatEl, this.lanesEl, this.tokensEl, this.statsEl, this.attnEl].forEach(function (v, i) {
      v.dataset.view = VIEWS[i][0];
      h.appendChild(v);
    });
    h.appendChild(this.pop);
    this.show("chat");
    this.setMode("probability");
  };

  Workbench.prototype.show = function (view) {
    this.view = view;
    var self = this;
    VIEWS.forEach(function (v) {
      var on = v[0] === view;
      self.host.querySelector('.tf-view[data-view="' + v[0] + '"]') &&
        (self.host.querySelector('.tf-view[data-view="' + v[0] + '"]').hidden = !on);
      self.tabEls[v[0]].setAttribute("aria-selected", on ? "true" : "false");
    });
    if (view !== "tokens") this.hidePop(true);
    if (view === "chat") this.scrollSoon(true);
  };

  Workbench.prototype.clear = function () {
    [this.chatEl, this.tokList, this.laneWrap, this.statsEl, this.legend].forEach(function (e) {
      while (e.firstChild) e.removeChild(e.firstChild);
    });
    this.sid = null;
    this.voices = new Map(); // name -> {color, glyph, lane, desc, button}
    this.defaultVoice = "main";
    this.msgs = new Map();
    this.msg = null;
    this.blocksByVoice = new Map();
    this.blockStarts = []; // [firstTok, block] in order, for lane clicks
    this.tokens = [];
    this.lanes = new Map();
    this.laneOrder = [];
    this.nTok = 0;
    this.px = parseInt(this.zoomEl.value, 10) || 3;
    this.axis = el("div", "tf-axis");
    this.laneWrap.appendChild(this.axis);
    this.ticks = 0;
    this.attn = null;
    this.attnBody.textContent = "Pick a token (in the Tokens view, or by number).";
    this.hidePop(true);
    this.statsEl.appendChild(el("p", "tf-empty", "No tokens yet."));
    this.host.dataset.tokens = "0";
  };

  // -- voices and legend -------------------------------------------------------------------

  Workbench.prototype.voice = function (name, color) {
    name = str(name);
    var v = this.voices.get(name);
    if (v) return v;
    var lane = name === this.defaultVoice ? 0 : 1e6 + this.voices.size;
    v = { name: name, color: safeColor(color), glyph: "", lane: lane, desc: "" };
    this.voices.set(name, v);
    this.addLegend(v);
    return v;
  };

  Workbench.prototype.addLegend = function (v) {
    var self = this;
    var b = el("button", "tf-leg");
    b.type = "button";
    b.dataset.voice = v.name;
    b.setAttribute("aria-pressed", this.hidden.has(v.name) ? "false" : "true");
    b.title = v.desc ? v.name + ": " + v.desc : v.name;
    var sw = el("span", "tf-sw");
    sw.style.backgroundColor = v.color;
    b.appendChild(sw);
    if (v.glyph) b.appendChild(el("span", "tf-glyph", v.glyph));
    b.appendChild(el("span", "tf-vname", v.name));
    b.addEventListener("click", function () {
      self.toggleVoice(v.name);
    });
    v.button = b;
    this.legend.appendChild(b);
  };

  Workbench.prototype.toggleVoice = function (name) {
    var hide = !this.hidden.has(name);
    if (hide) this.hidden.add(name);
    else this.hidden.delete(name);
    var v = this.voices.get(name);
    if (v && v.button) v.button.setAttribute("aria-pressed", hide ? "false" : "true");
    var list = this.blocksByVoice.get(name) || [];
    for (var i = 0; i < list.length; i++) list[i].el.classList.toggle("tf-hidden", hide);
    var lane = this.lanes.get(name);
    if (lane) lane.row.classList.toggle("tf-hidden", hide);
  };

  // -- chat --------------------------------------------------------------------------------

  Workbench.prototype.startMessage = function (mid, role, status, base) {
    var m = {
      id: mid,
      role: str(role),
      status: str(status),
      base: num(base) || 0,
      cur: null,
      pending: null,
      el: el("div", "tf-msg"),
      tokEl: null,
    };
    m.el.dataset.role = m.role;
    m.el.dataset.msg = String(mid);
    m.el.dataset.status = m.status;
    var head = el("div", "tf-msg-head");
    head.appendChild(el("span", "tf-role", m.role === "user" ? "You" : m.role === "assistant" ? "Model" : m.role));
    m.badge = el("span", "tf-badge", m.status === "streaming" ? "streaming…" : "");
    head.appendChild(m.badge);
    m.el.appendChild(head);
    this.chatEl.appendChild(m.el);
    this.msgs.set(mid, m);
    this.msg = m;
    if (m.role === "assistant") {
      m.tokEl = el("div", "tf-tokmsg");
      m.tokEl.dataset.msg = String(mid);
      this.tokList.appendChild(m.tokEl);
      this.laneMark(m.base);
    }
    this.scrollSoon(false);
    return m;
  };

  Workbench.prototype.openBlock = function (voice, color, marker, tok) {
    var m = this.msg;
    if (!m) m = this.startMessage(-1, "assistant", "done", this.nTok);
    this.closeBlock("");
    var v = this.voice(voice, color);
    m.pending = { voice: v, marker: str(marker), tok: num(tok) };
    // Explicit markers show the block at once; the implicit default voice waits for real text.
    if (m.pending.marker) this.materialise(m);
  };

  Workbench.prototype.materialise = function (m) {
    var p = m.pending;
    m.pending = null;
    var d = el("details", "tf-block");
    d.open = true;
    d.dataset.voice = p.voice.name;
    d.style.setProperty("--vc", p.voice.color);
    var s = el("summary", "tf-label");
    if (p.voice.glyph) s.appendChild(el("span", "tf-glyph", p.voice.glyph));
    s.appendChild(el("span", "tf-vname", p.voice.name));
    if (p.marker && p.marker !== "[" + p.voice.name + "]") {
      var mk = el("span", "tf-marker", p.marker);
      s.appendChild(mk);
    }
    d.appendChild(s);
    var body = el("div", "tf-body");
    var line = el("div", "tf-ln");
    body.appendChild(line);
    d.appendChild(body);
    if (this.hidden.has(p.voice.name)) d.classList.add("tf-hidden");
    m.el.appendChild(d);
    var b = { el: d, body: body, line: line, voice: p.voice.name, tok: p.tok, started: false, msg: m };
    m.cur = b;
    var list = this.blocksByVoice.get(b.voice);
    if (!list) this.blocksByVoice.set(b.voice, (list = []));
    list.push(b);
    if (b.tok != null) this.blockStarts.push([b.tok, b]);
    this.scrollSoon(false);
    return b;
  };

  Workbench.prototype.text = function (t, tok) {
    var m = this.msg;
    if (!m) return;
    t = str(t);
    if (!t) return;
    var b = m.cur;
    if (!b) {
      if (!m.pending) m.pending = { voice: this.voice(this.defaultVoice, MAIN), marker: "", tok: null };
      if (!t.trim()) return; // whitespace between voices does not make a block
      if (m.pending.tok == null && num(tok) != null) m.pending.tok = tok;
      b = this.materialise(m);
    }
    if (b.tok == null && num(tok) != null) {
      b.tok = tok;
      this.blockStarts.push([tok, b]);
    }
    if (!b.started) {
      t = t.replace(/^[ \t\r\n]+/, "");
      if (!t) return;
      b.started = true;
    }
    var parts = t.split("\n");
    for (var i = 0; i < parts.length; i++) {
      if (i > 0) {
        b.line = el("div", "tf-ln");
        b.lineLen = 0;
        b.body.appendChild(b.line);
      }
      var piece = parts[i].replace(/\r/g, "");
      if (!piece) continue;
      // A paragraph that never ends would be laid out again in full for every token: past
      // LONG_LINE characters continue it in a new box, at a word boundary.
      if ((b.lineLen || 0) > LONG_LINE && /^\s/.test(piece)) {
        b.line = el("div", "tf-ln tf-cont");
        b.lineLen = 0;
        b.body.appendChild(b.line);
      }
      b.line.appendChild(document.createTextNode(piece));
      b.lineLen = (b.lineLen || 0) + piece.length;
    }
    this.scrollSoon(false);
  };

  Workbench.prototype.closeBlock = function (marker) {
    var m = this.msg;
    if (!m) return;
    m.pending = null;
    var b = m.cur;
    if (!b) return;
    m.cur = null;
    // Trailing blank lines are layout, not content.
    var body = b.body;
    while (body.childNodes.length > 1 && !body.lastChild.textContent.trim()) body.removeChild(body.lastChild);
    if (marker) b.el.dataset.close = str(marker);
  };

  Workbench.prototype.endMessage = function (status, message) {
    var m = this.msg;
    if (!m) return;
    this.closeBlock("");
    m.status = str(status);
    m.el.dataset.status = m.status;
    var label = "";
    if (m.status === "cancelled") label = "interrupted (stopped)";
    else if (m.status === "interrupted") label = "interrupted";
    else if (m.status === "error") label = "error";
    m.badge.textContent = label;
    if (message && m.status !== "done") {
      var note = el("div", "tf-note", str(message));
      m.el.appendChild(note);
    }
    this.scrollSoon(false);
  };

  Workbench.prototype.scrollSoon = function (force) {
    var self = this;
    if (force) this.stick = true;
    if (this.scrollPending || !this.stick) return;
    this.scrollPending = true;
    requestAnimationFrame(function () {
      self.scrollPending = false;
      if (self.stick && self.view === "chat") self.chatEl.scrollTop = self.chatEl.scrollHeight;
    });
  };

  Workbench.prototype.reveal = function (voice, tok) {
    var best = null;
    var arr = this.blockStarts;
    for (var i = 0; i < arr.length; i++) {
      if (arr[i][0] <= tok) {
        if (arr[i][1].voice === voice || !best || best.voice !== voice) best = arr[i][1];
      } else break;
    }
    if (!best) return;
    this.show("chat");
    this.stick = false;
    best.el.open = true;
    best.el.scrollIntoView({ block: "center" });
    best.el.classList.remove("tf-flash");
    void best.el.offsetWidth;
    best.el.classList.add("tf-flash");
  };

  // -- tokens ------------------------------------------------------------------------------

  Workbench.prototype.token = function (ev) {
    var i = num(ev[1]);
    if (i == null) return;
    var rec = {
      i: i,
      text: str(ev[2]),
      voice: str(ev[3]),
      lp: num(ev[4]),
      ent: num(ev[5]),
      alts: Array.isArray(ev[6]) ? ev[6] : [],
      att: ev[7] ? 1 : 0,
    };
    this.tokens[i] = rec;
    if (i + 1 > this.nTok) this.nTok = i + 1;
    var m = this.msg;
    var box = m && m.tokEl ? m.tokEl : this.tokList;
    var s = el("span", "tf-tok", visible(rec.text));
    s.dataset.tokenIndex = String(i);
    s.tabIndex = 0;
    var v = this.voices.get(rec.voice);
    s.style.borderBottomColor = v ? v.color : MAIN;
    this.shade(s, rec);
    box.appendChild(s);
    this.laneToken(rec);
    var now = performance.now();
    var st = this.stats;
    st.tokens++;
    if (st.firstAt == null) st.firstAt = now;
    st.lastAt = now;
    st.lastWall = performance.timeOrigin + now;
    st.lastIndex = i;
  };

  Workbench.prototype.shade = function (s, rec) {
    var a = 0;
    if (this.mode === "probability") {
      if (rec.lp != null) a = (1 - Math.exp(rec.lp)) * 0.85;
      s.style.backgroundColor = rgba("#E8590C", a);
    } else {
      if (rec.ent != null) a = Math.min(1, rec.ent / 4) * 0.85;
      s.style.backgroundColor = rgba("#5F3DC4", a);
    }
    s.dataset.shade = a.toFixed(3);
  };

  Workbench.prototype.setMode = function (mode) {
    this.mode = mode === "entropy" ? "entropy" : "probability";
    var self = this;
    this.tokensEl.querySelectorAll(".tf-mode").forEach(function (b) {
      b.setAttribute("aria-pressed", b.dataset.mode === self.mode ? "true" : "false");
    });
    this.tokList.querySelectorAll(".tf-tok").forEach(function (s) {
      var rec = self.tokens[parseInt(s.dataset.tokenIndex, 10)];
      if (rec) self.shade(s, rec);
    });
  };

  Workbench.prototype.hidePop = function (unpin) {
    if (unpin) this.pinned = false;
    if (this.pop) this.pop.hidden = true;
  };

  Workbench.prototype.popover = function (span, pin) {
    var rec = this.tokens[parseInt(span.dataset.tokenIndex, 10)];
    if (!rec) return;
    this.pinned = !!pin;
    var p = this.pop;
    while (p.firstChild) p.removeChild(p.firstChild);
    var head = el("div", "tf-pop-head");
    head.appendChild(el("code", "tf-pop-tok", visible(rec.text) || "\u2205"));
    var v = this.voices.get(rec.voice);
    var vn = el("span", "tf-pop-voice", rec.voice);
    vn.style.borderColor = v ? v.color : MAIN;
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
        var a = alts[k];
        var text = str(a[0]);
        var lp = num(a[1]);
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
    } else {
      p.appendChild(el("div", "tf-pop-none", "no alternatives recorded"));
    }
    if (rec.att) {
      var ab = el("button", "tf-pop-att", "Attention →");
      ab.type = "button";
      ab.dataset.act = "attention";
      ab.dataset.tok = String(rec.i);
      p.appendChild(ab);
    }
    p.hidden = false;
    var r = span.getBoundingClientRect();
    var hr = this.host.getBoundingClientRect();
    p.style.left = Math.max(0, Math.min(r.left - hr.left, hr.width - 320)) + "px";
    p.style.top = r.bottom - hr.top + 4 + "px";
  };

  // -- lanes -------------------------------------------------------------------------------

  Workbench.prototype.lane = function (name) {
    var ln = this.lanes.get(name);
    if (ln) return ln;
    var v = this.voice(name, MAIN);
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
    if (this.hidden.has(name)) row.classList.add("tf-hidden");
    ln = { row: row, track: track, last: null, lane: v.lane, color: v.color };
    // Keep lanes in the voice set's lane order (unknown voices after, as they appear).
    var before = null;
    for (var i = 0; i < this.laneOrder.length; i++) {
      if (this.laneOrder[i].lane > ln.lane) {
        before = this.laneOrder[i];
        this.laneOrder.splice(i, 0, ln);
        break;
      }
    }
    if (before) this.laneWrap.insertBefore(row, before.row);
    else {
      this.laneOrder.push(ln);
      this.laneWrap.appendChild(row);
    }
    this.lanes.set(name, ln);
    return ln;
  };

  Workbench.prototype.laneToken = function (rec) {
    var ln = this.lane(rec.voice);
    var last = ln.last;
    if (last && last.end === rec.i - 1 && last.msg === this.msg) {
      last.end = rec.i;
      last.el.dataset.end = String(rec.i);
      last.el.style.width = (last.end - last.start + 1) * this.px + "px";
    } else {
      var s = el("div", "tf-span");
      s.style.left = rec.i * this.px + "px";
      s.style.width = this.px + "px";
      s.style.backgroundColor = ln.color;
      s.dataset.voice = rec.voice;
      s.dataset.start = String(rec.i);
      s.dataset.end = String(rec.i);
      ln.track.appendChild(s);
      last = ln.last = { el: s, start: rec.i, end: rec.i, msg: this.msg };
      var self = this;
      var voice = rec.voice;
      s.addEventListener("click", function () {
        self.reveal(voice, parseInt(s.dataset.start, 10));
      });
    }
    last.el.title = rec.voice + " · tokens " + last.start + "–" + last.end;
    var w = (rec.i + 1) * this.px;
    if (w > (this.laneWidth || 0)) {
      this.laneWidth = w + 200 * this.px;
      this.laneWrap.style.setProperty("--tf-w", this.laneWidth + "px");
    }
    while (this.ticks * 100 <= rec.i) {
      var tk = el("span", "tf-tick", String(this.ticks * 100));
      tk.style.left = this.ticks * 100 * this.px + "px";
      tk.dataset.at = String(this.ticks * 100);
      this.axis.appendChild(tk);
      this.ticks++;
    }
    this.lanesInfo.textContent = this.nTok + " tokens";
  };

  Workbench.prototype.laneMark = function (at) {
    var mk = el("span", "tf-msgmark");
    mk.style.left = at * this.px + "px";
    mk.dataset.at = String(at);
    this.axis.appendChild(mk);
  };

  Workbench.prototype.setZoom = function (px) {
    this.px = px;
    var self = this;
    this.laneWrap.querySelectorAll(".tf-span").forEach(function (s) {
      var a = parseInt(s.dataset.start, 10);
      var b = parseInt(s.dataset.end, 10);
      s.style.left = a * px + "px";
      s.style.width = (b - a + 1) * px + "px";
    });
    this.axis.querySelectorAll("[data-at]").forEach(function (t) {
      t.style.left = parseInt(t.dataset.at, 10) * px + "px";
    });
    this.laneWidth = (this.nTok + 200) * px;
    this.laneWrap.style.setProperty("--tf-w", this.laneWidth + "px");
  };

  // -- stats -------------------------------------------------------------------------------

  Workbench.prototype.renderStats = function (rows, tm) {
    var s = this.statsEl;
    while (s.firstChild) s.removeChild(s.firstChild);
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
    var self = this;
    rows.forEach(function (r) {
      if (!Array.isArray(r)) return;
      var tr = el("tr");
      tr.dataset.voice = str(r[0]);
      var td = el("td", "tf-stat-voice");
      var sw = el("span", "tf-sw");
      var v = self.voices.get(str(r[0]));
      sw.style.backgroundColor = v ? v.color : MAIN;
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
    var order = tm[0];
    var mat = tm[1];
    var max = 0;
    mat.forEach(function (row) {
      row.forEach(function (x) {
        if (num(x) != null && x > max) max = x;
      });
    });
    s.appendChild(el("h4", null, "Voice transitions (row → column)"));
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
        var c = el("span", "tf-mx-cell", x ? String(x) : "");
        c.style.backgroundColor = rgba("#3366DD", max ? (x / max) * 0.8 : 0);
        c.title = str(n) + " → " + str(m) + ": " + x;
        c.dataset.from = str(n);
        c.dataset.to = str(m);
        g.appendChild(c);
      });
    });
    s.appendChild(g);
  };

  // -- attention ---------------------------------------------------------------------------

  Workbench.prototype.loadAttention = function (i) {
    var self = this;
    this.attnBody.textContent = "Loading…";
    if (!this.server || !this.server.tf_attention) {
      this.attnBody.textContent = "Attention is not available here.";
      return;
    }
    this.server
      .tf_attention(this.sid, i)
      .then(function (res) {
        self.attn = res && typeof res === "object" ? res : null;
        var n = self.attn && Array.isArray(self.attn.layers) ? self.attn.layers.length : 0;
        self.attnLayer.max = String(Math.max(0, n - 1));
        if (parseInt(self.attnLayer.value, 10) > n - 1) self.attnLayer.value = String(Math.max(0, n - 1));
        self.renderAttention();
      })
      .catch(function () {
        self.attnBody.textContent = "Could not load attention.";
      });
  };

  Workbench.prototype.renderAttention = function () {
    var b = this.attnBody;
    while (b.firstChild) b.removeChild(b.firstChild);
    var a = this.attn;
    if (!a) {
      b.textContent = "No such token.";
      return;
    }
    var layers = Array.isArray(a.layers) ? a.layers : [];
    b.appendChild(el("div", "tf-attn-title", "Token #" + str(a.index) + " " + visible(a.text)));
    if (!layers.length) {
      b.appendChild(el("p", "tf-empty", "This trace has no attention data for that token (record with the transformers backend and attention on)."));
      this.attnLayerLabel.textContent = "";
      return;
    }
    var li = Math.min(layers.length - 1, parseInt(this.attnLayer.value, 10) || 0);
    this.attnLayerLabel.textContent = "layer " + li + " / " + (layers.length - 1);
    var L = layers[li] || {};
    var self = this;
    if (num(L.prompt) != null) b.appendChild(el("div", "tf-attn-prompt", "prompt: " + (L.prompt * 100).toFixed(1) + "%"));
    var segs = el("div", "tf-bars");
    segs.appendChild(el("h4", null, "Mass per segment"));
    (Array.isArray(L.segments) ? L.segments : []).forEach(function (r) {
      if (!Array.isArray(r)) return;
      var row = el("div", "tf-barrow");
      row.appendChild(el("span", "tf-bar-label", str(r[0])));
      var bar = el("span", "tf-meter");
      var f = el("span", "tf-fill");
      f.style.width = Math.round((num(r[3]) || 0) * 100) + "%";
      f.style.backgroundColor = safeColor(r[2]);
      bar.appendChild(f);
      row.appendChild(bar);
      row.appendChild(el("span", "tf-bar-val", ((num(r[3]) || 0) * 100).toFixed(1) + "%"));
      if (r[4]) row.title = str(r[4]);
      segs.appendChild(row);
    });
    b.appendChild(segs);
    var tops = el("div", "tf-bars");
    tops.appendChild(el("h4", null, "Top positions"));
    (Array.isArray(L.top) ? L.top : []).forEach(function (r) {
      if (!Array.isArray(r)) return;
      var row = el("div", "tf-barrow");
      row.appendChild(el("span", "tf-bar-label", "@" + str(r[0]) + " " + str(r[2])));
      var bar = el("span", "tf-meter");
      var f = el("span", "tf-fill");
      f.style.width = Math.round((num(r[3]) || 0) * 100) + "%";
      bar.appendChild(f);
      row.appendChild(bar);
      row.appendChild(el("span", "tf-bar-val", ((num(r[3]) || 0) * 100).toFixed(1) + "%"));
      var gi = num(r[1]);
      if (gi != null) {
        row.classList.add("tf-link");
        row.addEventListener("click", function () {
          self.attnTok.value = String(gi);
          self.loadAttention(gi);
        });
      }
      tops.appendChild(row);
    });
    b.appendChild(tops);
  };

  // -- payloads ----------------------------------------------------------------------------

  Workbench.prototype.receive = function (raw) {
    var self = this;
    if (typeof raw !== "string" || !raw) return;
    var p;
    try {
      p = JSON.parse(raw);
    } catch (e) {
      return;
    }
    if (!p || typeof p !== "object" || !Array.isArray(p.ev)) return;
    this.chain = this.chain.then(function () {
      return self.handle(p, raw.length);
    }).catch(function (e) {
      console.error("thoughtform:", e);
    });
  };

  Workbench.prototype.handle = function (p, bytes) {
    var self = this;
    var n = num(p.n) || 0;
    if (n && n === this.lastNonce) return;
    this.lastNonce = n;
    var st = this.stats;
    st.payloads++;
    st.bytes += bytes;
    var ev = p.ev;
    if (typeof p.run === "string" && p.run) {
      var next = this.runs[p.run] || 0;
      var from = num(p.from) || 0;
      if (from > next && this.server && this.server.tf_events) {
        // A payload went missing (updates coalesced): fetch the gap, then go on in order.
        return this.server.tf_events(p.run, next, from).then(function (gap) {
          if (Array.isArray(gap) && gap.length === from - next) {
            self.apply(gap);
            self.runs[p.run] = from;
          }
          self.runs[p.run] = Math.max(self.runs[p.run] || 0, from);
          self.finishRun(p, ev, from);
        });
      }
      if (from < next) ev = ev.slice(next - from);
      this.finishRun(p, ev, Math.max(from, next));
      return;
    }
    this.apply(ev);
  };

  Workbench.prototype.finishRun = function (p, ev, from) {
    this.runs[p.run] = from + ev.length;
    var t0 = performance.now();
    var n0 = this.stats.tokens;
    this.apply(ev);
    // With a log (benchmarks): when, run, tokens applied, milliseconds spent applying, nonce.
    if (this.stats.log) this.stats.log.push([t0, p.run, this.stats.tokens - n0, performance.now() - t0, p.n]);
  };

  Workbench.prototype.apply = function (evs) {
    for (var k = 0; k < evs.length; k++) {
      var e = evs[k];
      if (!Array.isArray(e)) continue;
      switch (e[0]) {
        case "R":
          this.clear();
          break;
        case "V":
          this.setVoices(e[1], e[2]);
          break;
        case "X":
          this.chatEl.appendChild(
            el("p", "tf-empty tf-skipped", (num(e[1]) || 0) + " earlier messages are not shown here (export the session to see them).")
          );
          break;
        case "N":
          this.sid = str(e[1]);
          this.host.dataset.session = this.sid;
          break;
        case "M":
          this.startMessage(e[1], e[2], e[3], e[4]);
          break;
        case "O":
          this.openBlock(e[1], e[2], e[3], e[4]);
          break;
        case "T":
          this.text(e[1], e[2]);
          break;
        case "C":
          this.closeBlock(e[1]);
          break;
        case "K":
          this.token(e);
          break;
        case "E":
          this.endMessage(e[1], e[2]);
          if (num(e[3]) != null) this.stats.producedLast = e[3];
          break;
        case "S":
          this.renderStats(e[1], e[2]);
          break;
      }
    }
    this.host.dataset.tokens = String(this.nTok);
  };

  Workbench.prototype.setVoices = function (rows, def) {
    this.defaultVoice = str(def) || "main";
    var self = this;
    (Array.isArray(rows) ? rows : []).forEach(function (r) {
      if (!Array.isArray(r)) return;
      var v = self.voice(r[0], r[1]);
      v.color = safeColor(r[1]);
      v.glyph = str(r[2]).slice(0, 4);
      v.lane = num(r[3]) == null ? v.lane : r[3];
      v.desc = str(r[4]);
      if (v.button) {
        v.button.parentNode.removeChild(v.button);
        self.addLegend(v);
      }
    });
  };

  window.thoughtform = {
    version: 1,
    instances: [],
    mount: function (element, props, server, watch) {
      var host = element.querySelector(".tf-wb") || element;
      var wb = new Workbench(host, server);
      window.thoughtform.instances.push(wb);
      window.thoughtform.current = wb;
      if (props && props.value) wb.receive(props.value);
      if (watch) {
        watch("value", function () {
          wb.receive(props.value);
        });
      }
      return wb;
    },
  };
})();
