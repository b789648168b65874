/* Chat view: each message as coloured, labelled, collapsible voice blocks, streamed token by
 * token; the empty-chat panel (what is active, example prompts); errors as blocks in the chat.
 *
 * Events: I (what is active), X (older messages not shown), M/O/T/C/E (messages and blocks),
 * ! (an error that is not a reply's). Text only through textContent (see workbench.js).
 */
(function (TF) {
  "use strict";
  if (!TF || !TF.defineView) return;
  var U = TF.util;
  var el = U.el, str = U.str, num = U.num;
  var LONG_LINE = 1500;
  var STICK_PX = 48; // this close to the bottom counts as "at the bottom"
  var USER_SCROLL_MS = 800; // a scroll this soon after wheel/touch/key/mouse input is the user's

  function Chat(wb, box) {
    this.wb = wb;
    this.el = box;
    box.setAttribute("aria-live", "off");
    this.stick = true;
    this.userAt = -1e9;
    var self = this;
    // Only the user unsticks the chat from the bottom. Scroll events also come from our own
    // scrolling and from blocks growing to their real size (content-visibility: auto estimates
    // off-screen blocks, so a block's height changes once it scrolls into view); treating those
    // as the user's left the view stuck hundreds of pixels above the last block.
    var intent = function () {
      self.userAt = performance.now();
    };
    ["wheel", "touchstart", "touchmove", "mousedown", "keydown"].forEach(function (t) {
      box.addEventListener(t, intent, { passive: true });
    });
    box.addEventListener("scroll", function () {
      var c = self.el;
      if (c.scrollHeight - c.scrollTop - c.clientHeight < STICK_PX) self.stick = true;
      else if (performance.now() - self.userAt < USER_SCROLL_MS) self.stick = false;
    });
    wb.on("I", function (e) {
      self.setInfo(e[1]);
    });
    wb.on("X", function (e) {
      self.el.appendChild(
        el("p", "tf-empty tf-skipped", (num(e[1]) || 0) + " earlier messages are not shown here (export the session to see them).")
      );
    });
    wb.on("M", function (e) {
      self.startMessage(e[1], e[2], e[3], e[4]);
    });
    wb.on("O", function (e) {
      self.openBlock(e[1], e[2], e[3], e[4]);
    });
    wb.on("T", function (e) {
      self.text(e[1], e[2]);
    });
    wb.on("C", function (e) {
      self.closeBlock(e[1]);
    });
    wb.on("E", function (e) {
      self.endMessage(e[1], e[2]);
    });
    wb.on("!", function (e) {
      self.error(e[1]);
    });
  }

  Chat.prototype.clear = function () {
    U.empty(this.el);
    this.msgs = new Map();
    this.msg = null;
    this.blocksByVoice = new Map();
    this.blockStarts = []; // [firstTok, block] in order, for lane clicks
    this.welcome = el("div", "tf-welcome");
    this.el.appendChild(this.welcome);
    this.setInfo(this.info || null);
  };

  // -- the empty chat ----------------------------------------------------------------------

  Chat.prototype.setInfo = function (info) {
    this.info = info && typeof info === "object" ? info : null;
    var w = this.welcome;
    U.empty(w);
    w.appendChild(el("h3", "tf-welcome-title", "Start a conversation"));
    var facts = el("dl", "tf-welcome-facts");
    var i = this.info || {};
    [
      ["Backend", "backend"],
      ["Model", "model"],
      ["Voices", "voices"],
    ].forEach(function (f) {
      facts.appendChild(el("dt", null, f[0]));
      var dd = el("dd", null, str(i[f[1]]) || "–");
      dd.dataset.fact = f[1];
      facts.appendChild(dd);
    });
    w.appendChild(facts);
    var examples = Array.isArray(i.examples) ? i.examples : [];
    if (examples.length) {
      w.appendChild(el("p", "tf-welcome-hint", "Try one of these, or write your own below:"));
      var row = el("div", "tf-examples");
      var wb = this.wb;
      examples.slice(0, 6).forEach(function (x) {
        var b = el("button", "tf-example", str(x).slice(0, 300));
        b.type = "button";
        b.addEventListener("click", function () {
          wb.sendPrompt(str(x));
        });
        row.appendChild(b);
      });
      w.appendChild(row);
    }
    w.hidden = this.msgs && this.msgs.size > 0;
  };

  // -- messages and blocks -----------------------------------------------------------------

  Chat.prototype.startMessage = function (mid, role, status, base) {
    var m = {
      id: mid,
      role: str(role),
      status: str(status),
      base: num(base) || 0,
      cur: null,
      pending: null,
      el: el("div", "tf-msg"),
    };
    m.el.dataset.role = m.role;
    m.el.dataset.msg = String(mid);
    m.el.dataset.status = m.status;
    var head = el("div", "tf-msg-head");
    head.appendChild(el("span", "tf-role", m.role === "user" ? "You" : m.role === "assistant" ? "Model" : m.role));
    m.badge = el("span", "tf-badge", m.status === "streaming" ? "streaming…" : "");
    head.appendChild(m.badge);
    m.el.appendChild(head);
    this.el.appendChild(m.el);
    this.msgs.set(mid, m);
    this.msg = m;
    this.welcome.hidden = true;
    this.scrollSoon(false);
    return m;
  };

  Chat.prototype.openBlock = function (voice, color, marker, tok) {
    var m = this.msg;
    if (!m) m = this.startMessage(-1, "assistant", "done", this.wb.nTok);
    this.closeBlock("");
    var v = this.wb.voice(voice, color);
    m.pending = { voice: v, marker: str(marker), tok: num(tok) };
    // Explicit markers show the block at once; the implicit default voice waits for real text.
    if (m.pending.marker) this.materialise(m);
  };

  // Hiding a voice hides the model's blocks in it, never what the user wrote.
  function hideable(m) {
    return m.role !== "user";
  }

  Chat.prototype.materialise = function (m) {
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
      s.appendChild(el("span", "tf-marker", p.marker));
    }
    d.appendChild(s);
    var body = el("div", "tf-body");
    var line = el("div", "tf-ln");
    body.appendChild(line);
    d.appendChild(body);
    if (hideable(m) && this.wb.hidden.has(p.voice.name)) d.classList.add("tf-hidden");
    m.el.appendChild(d);
    var b = { el: d, body: body, line: line, voice: p.voice.name, tok: p.tok, started: false, msg: m };
    m.cur = b;
    if (hideable(m)) {
      var list = this.blocksByVoice.get(b.voice);
      if (!list) this.blocksByVoice.set(b.voice, (list = []));
      list.push(b);
    }
    if (b.tok != null) this.blockStarts.push([b.tok, b]);
    this.scrollSoon(false);
    return b;
  };

  Chat.prototype.text = function (t, tok) {
    var m = this.msg;
    if (!m) return;
    t = str(t);
    if (!t) return;
    var b = m.cur;
    if (!b) {
      if (!m.pending) m.pending = { voice: this.wb.voice(this.wb.defaultVoice, U.MAIN), marker: "", tok: null };
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

  Chat.prototype.closeBlock = function (marker) {
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

  Chat.prototype.endMessage = function (status, message) {
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
      var note = el("div", m.status === "error" ? "tf-note tf-error" : "tf-note", str(message));
      if (m.status === "error") note.setAttribute("role", "alert");
      m.el.appendChild(note);
    }
    this.scrollSoon(false);
  };

  /** An error that belongs to no reply (the backend could not start, say): a block in the chat. */
  Chat.prototype.error = function (message) {
    var d = el("div", "tf-msg tf-errmsg");
    d.dataset.role = "error";
    d.setAttribute("role", "alert");
    var head = el("div", "tf-msg-head");
    head.appendChild(el("span", "tf-role", "Error"));
    d.appendChild(head);
    d.appendChild(el("div", "tf-note tf-error", str(message).slice(0, 4000)));
    this.el.appendChild(d);
    this.scrollSoon(true);
  };

  Chat.prototype.setHidden = function (name, hide) {
    var list = this.blocksByVoice.get(name) || [];
    for (var i = 0; i < list.length; i++) list[i].el.classList.toggle("tf-hidden", hide);
  };

  // -- scrolling ---------------------------------------------------------------------------

  Chat.prototype.shown = function () {
    this.scrollSoon(true);
  };

  /** Keep the last block in view (coalesced to one animation frame), while stuck to the bottom.
   * Scrolls again on the following frames until the bottom holds: blocks that scroll into view
   * are laid out at their real height only then. */
  Chat.prototype.scrollSoon = function (force) {
    if (force) this.stick = true;
    if (this.scrollPending || !this.stick) return;
    this.scrollPending = true;
    var self = this;
    var tries = 0;
    var step = function () {
      var c = self.el;
      if (!self.stick || self.wb.view !== "chat") {
        self.scrollPending = false;
        return;
      }
      if (tries > 0 && c.scrollHeight - c.scrollTop - c.clientHeight <= 1) {
        self.scrollPending = false;
        return;
      }
      c.scrollTop = c.scrollHeight;
      if (++tries < 12) requestAnimationFrame(step);
      else self.scrollPending = false;
    };
    requestAnimationFrame(step);
  };

  /** Show the block of ``voice`` that holds token ``tok`` (lane clicks). */
  Chat.prototype.reveal = function (voice, tok) {
    var best = null;
    var arr = this.blockStarts;
    for (var i = 0; i < arr.length; i++) {
      if (arr[i][0] <= tok) {
        if (arr[i][1].voice === voice || !best || best.voice !== voice) best = arr[i][1];
      } else break;
    }
    if (!best) return;
    this.wb.show("chat");
    this.stick = false;
    best.el.open = true;
    best.el.scrollIntoView({ block: "center" });
    best.el.classList.remove("tf-flash");
    void best.el.offsetWidth;
    best.el.classList.add("tf-flash");
  };

  TF.defineView({
    id: "chat",
    label: "Chat",
    create: function (wb, box) {
      return new Chat(wb, box);
    },
  });
})(window.thoughtform);
