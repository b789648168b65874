/* thoughtform workbench renderer: the core (loaded first; each view lives in its own file).
 *
 *   workbench.js       this file: helpers, the payload stream, voices and legend, view tabs
 *   view-chat.js       Chat: messages as coloured voice blocks, the empty-chat panel, errors
 *   view-lanes.js      Lanes: one lane per voice on a shared token axis
 *   view-tokens.js     Tokens: shaded tokens and the alternatives popover
 *   view-stats.js      Stats: per-voice numbers and the transition matrix
 *   view-attention.js  Attention: per-layer mass per segment, top positions, logit lens
 *
 * The core receives small JSON payloads (see thoughtform/ui/stream.py), keeps them in order
 * (fetching any gap), and hands each event to the views that registered for its type with
 * ``wb.on(type, fn)``. Model text, voice names and alternatives only ever reach the page
 * through textContent / setAttribute / dataset; colours only after matching ^#[0-9A-Fa-f]{6}$;
 * numbers only after isFinite. Nothing here or in a view uses innerHTML, insertAdjacentHTML or
 * document.write.
 */
(function () {
  "use strict";
  if (window.thoughtform && window.thoughtform.version === 2) return;

  var HEX = /^#[0-9A-Fa-f]{6}$/;
  var MAIN = "#777777";
  // Where the page's own prompt box and send button are (elem_id in ui/app.py).
  var PROMPT = "#prompt textarea";
  var SEND = "#send";

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
  function empty(e) {
    while (e.firstChild) e.removeChild(e.firstChild);
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

  // Views register here (in load order); each Workbench makes one instance of each.
  var VIEWS = [];
  // Add-ons (steer.js): called with each new Workbench, after its views, to add handlers.
  var ADDONS = [];

  function Workbench(host, server) {
    this.host = host;
    this.server = server;
    this.chain = Promise.resolve();
    this.lastNonce = 0;
    this.runs = Object.create(null);
    this.view = "chat";
    this.hidden = new Set(); // voices hidden in the session shown (a per-session view setting)
    this.handlers = Object.create(null);
    this.views = Object.create(null);
    this.stats = { tokens: 0, payloads: 0, bytes: 0, firstAt: null, lastAt: null, log: null };
    this.build();
    this.clear();
    for (var a = 0; a < ADDONS.length; a++) ADDONS[a](this);
  }

  /** Call ``fn(event, extra)`` for every event of ``type`` (after the core has seen it). */
  Workbench.prototype.on = function (type, fn) {
    (this.handlers[type] || (this.handlers[type] = [])).push(fn);
  };

  Workbench.prototype.build = function () {
    var h = this.host;
    empty(h);
    var bar = el("div", "tf-bar");
    this.legend = el("div", "tf-legend");
    this.legend.setAttribute("role", "group");
    this.legend.setAttribute("aria-label", "Voices (click to hide or show)");
    this.tabs = el("div", "tf-views");
    this.tabs.setAttribute("role", "tablist");
    bar.appendChild(this.legend);
    bar.appendChild(this.tabs);
    h.appendChild(bar);
    this.tabEls = {};
    var self = this;
    VIEWS.forEach(function (spec) {
      var b = el("button", "tf-viewtab", spec.label);
      b.type = "button";
      b.dataset.view = spec.id;
      b.setAttribute("role", "tab");
      b.addEventListener("click", function () {
        self.show(spec.id);
      });
      self.tabs.appendChild(b);
      self.tabEls[spec.id] = b;
      var box = el("div", "tf-view " + (spec.cls || "tf-" + spec.id));
      box.dataset.view = spec.id;
      h.appendChild(box);
      var v = spec.create(self, box);
      v.box = box;
      self.views[spec.id] = v;
    });
    this.show("chat");
  };

  Workbench.prototype.show = function (id) {
    if (!this.views[id]) return;
    this.view = id;
    for (var k in this.views) {
      var v = this.views[k];
      var on = k === id;
      v.box.hidden = !on;
      this.tabEls[k].setAttribute("aria-selected", on ? "true" : "false");
      if (on && v.shown) v.shown();
      if (!on && v.hiddenView) v.hiddenView();
    }
  };

  Workbench.prototype.each = function (method) {
    var args = Array.prototype.slice.call(arguments, 1);
    for (var k in this.views) {
      var v = this.views[k];
      if (typeof v[method] === "function") v[method].apply(v, args);
    }
  };

  Workbench.prototype.clear = function () {
    empty(this.legend);
    this.sid = null;
    this.voices = new Map(); // name -> {name, color, glyph, lane, desc, button}
    this.defaultVoice = "main";
    this.nTok = 0;
    this.each("clear");
    this.host.dataset.tokens = "0";
  };

  // -- voices and legend -------------------------------------------------------------------

  /** The voice ``name`` (registered with ``color`` the first time it is seen). */
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

  Workbench.prototype.colorOf = function (name) {
    var v = this.voices.get(str(name));
    return v ? v.color : MAIN;
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

  // Hidden voices are remembered per session in this browser (never on the server).
  function hiddenKey(sid) {
    return "thoughtform.hidden." + sid;
  }

  Workbench.prototype.loadHidden = function (sid) {
    var names = [];
    try {
      var raw = window.localStorage.getItem(hiddenKey(sid));
      var got = raw ? JSON.parse(raw) : [];
      if (Array.isArray(got)) names = got.filter(function (x) { return typeof x === "string"; });
    } catch (e) {
      names = [];
    }
    this.hidden = new Set(names.slice(0, 200));
    var self = this;
    this.voices.forEach(function (v) {
      if (v.button) v.button.setAttribute("aria-pressed", self.hidden.has(v.name) ? "false" : "true");
    });
  };

  Workbench.prototype.saveHidden = function () {
    if (!this.sid) return;
    try {
      var key = hiddenKey(this.sid);
      if (this.hidden.size) window.localStorage.setItem(key, JSON.stringify(Array.from(this.hidden)));
      else window.localStorage.removeItem(key);
    } catch (e) {
      /* storage full or disabled: the setting lasts for this page only */
    }
  };

  Workbench.prototype.toggleVoice = function (name) {
    var hide = !this.hidden.has(name);
    if (hide) this.hidden.add(name);
    else this.hidden.delete(name);
    this.saveHidden();
    var v = this.voices.get(name);
    if (v && v.button) v.button.setAttribute("aria-pressed", hide ? "false" : "true");
    this.each("setHidden", name, hide);
  };

  /** Put ``text`` in the page's prompt box and press Send (the example prompts use this). */
  Workbench.prototype.sendPrompt = function (text) {
    var box = document.querySelector(PROMPT);
    var send = document.querySelector(SEND);
    if (!box || !send) return false;
    // Set the value the way typing does, so the page's framework sees the input.
    var setter = Object.getOwnPropertyDescriptor(window.HTMLTextAreaElement.prototype, "value").set;
    setter.call(box, str(text));
    box.dispatchEvent(new Event("input", { bubbles: true }));
    setTimeout(function () {
      send.click();
    }, 0);
    return true;
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

  // A token event as a record the views share: index, text, voice, logprob, entropy,
  // alternatives, and whether attention / a logit lens were recorded for it.
  function tokenRecord(ev) {
    var i = num(ev[1]);
    if (i == null) return null;
    var flags = num(ev[7]) || 0;
    return {
      i: i,
      text: str(ev[2]),
      voice: str(ev[3]),
      lp: num(ev[4]),
      ent: num(ev[5]),
      alts: Array.isArray(ev[6]) ? ev[6] : [],
      att: flags & 1 ? 1 : 0,
      lens: flags & 2 ? 1 : 0,
    };
  }

  Workbench.prototype.apply = function (evs) {
    for (var k = 0; k < evs.length; k++) {
      var e = evs[k];
      if (!Array.isArray(e)) continue;
      var type = e[0];
      var extra = null;
      switch (type) {
        case "R":
          this.clear();
          break;
        case "V":
          this.setVoices(e[1], e[2]);
          break;
        case "N":
          this.sid = str(e[1]);
          this.host.dataset.session = this.sid;
          this.loadHidden(this.sid);
          break;
        case "K":
          extra = tokenRecord(e);
          if (!extra) continue;
          if (extra.i + 1 > this.nTok) this.nTok = extra.i + 1;
          this.countToken(extra);
          break;
        case "E":
          if (num(e[3]) != null) this.stats.producedLast = e[3];
          break;
      }
      var hs = this.handlers[type];
      if (hs) for (var j = 0; j < hs.length; j++) hs[j](e, extra);
    }
    this.host.dataset.tokens = String(this.nTok);
  };

  Workbench.prototype.countToken = function (rec) {
    var now = performance.now();
    var st = this.stats;
    st.tokens++;
    if (st.firstAt == null) st.firstAt = now;
    st.lastAt = now;
    st.lastWall = performance.timeOrigin + now;
    st.lastIndex = rec.i;
  };

  window.thoughtform = {
    version: 2,
    instances: [],
    util: {
      MAIN: MAIN,
      safeColor: safeColor,
      num: num,
      str: str,
      el: el,
      empty: empty,
      rgba: rgba,
      visible: visible,
      fmt: fmt,
    },
    /** Register a view: {id, label, cls?, create(wb, box) -> view}. Views are shown in load order. */
    defineView: function (spec) {
      for (var i = 0; i < VIEWS.length; i++) if (VIEWS[i].id === spec.id) return;
      VIEWS.push(spec);
    },
    /** Register an add-on: ``fn(wb)`` runs for every Workbench made after this (steer.js). */
    addon: function (fn) {
      if (ADDONS.indexOf(fn) < 0) ADDONS.push(fn);
    },
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
