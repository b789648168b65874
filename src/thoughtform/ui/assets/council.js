/* The Council tab's renderer: draws whole council snapshots (JSON from council_view.py) into
 * one lane per member, one block per turn ([data-turn][data-voice]), the resonance arcs between
 * the lanes (an SVG over them: per turn, the earlier turns it draws on) and the matrix; and the
 * member list (tick, drag or move up / down to order), which writes the members to the page's
 * hidden #council-members box. Arcs and weights are computed in Python; this only draws them.
 * Model text, voice names and every other string from the server go in through textContent or
 * setAttribute only, never through innerHTML; colours are used only when they are #RRGGBB. */
(function () {
  "use strict";

  var HEX = /^#[0-9a-fA-F]{6}$/;
  var USER = "(user)";
  var GREY = "#777777";
  var SVG = "http://www.w3.org/2000/svg";
  var NOTES = {
    echo: "Row: who speaks. Column: whose words and phrases (first said there) it takes up.",
    attention:
      "Row: who speaks. Column: the share of its tokens' attention on that speaker's earlier turns.",
    counterfactual:
      "Row: who speaks. Column: how much more surprising (nats/token) its turns are without " +
      "that speaker's turn.",
  };

  function str(x) {
    return typeof x === "string" ? x : x == null ? "" : String(x);
  }
  function num(x) {
    return typeof x === "number" && isFinite(x) ? x : null;
  }
  function safeColor(c) {
    return typeof c === "string" && HEX.test(c) ? c : GREY;
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = str(text);
    return e;
  }
  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }
  function pct(x) {
    var v = 100 * x; // small shares (attention mass) keep a decimal: 0.4%, not 0%
    return (Math.abs(v) < 10 && v !== 0 ? v.toFixed(1) : String(Math.round(v))) + "%";
  }

  function Council(host) {
    this.host = host;
    this.last = null;
    this.id = null;
    this.blocks = new Map(); // turn index -> {box, text, shown}
    clear(host);
    this.status = el("div", "tf-c-status");
    this.status.setAttribute("role", "status");
    this.lanes = el("div", "tf-c-lanes");
    this.lanes.setAttribute("aria-label", "lanes: one per member, a mark per turn");
    this.rows = el("div", "tf-c-lane-rows");
    this.arcs = document.createElementNS(SVG, "svg");
    this.arcs.setAttribute("class", "tf-c-arcs");
    this.arcs.setAttribute("aria-label", "resonance arcs: each turn to the earlier turns it draws on");
    this.lanes.appendChild(this.rows);
    this.lanes.appendChild(this.arcs);
    this.arcData = { arcs: [], turns: [], colors: new Map(), unit: "" };
    var main = el("div", "tf-c-main");
    this.turns = el("div", "tf-c-turns");
    this.turns.setAttribute("aria-live", "polite");
    this.side = el("div", "tf-c-side");
    this.matrix = el("div", "tf-c-matrix");
    this.sideTitle = el("div", "tf-c-side-title", "Resonance (echo)");
    this.sideNote = el("div", "tf-c-side-note", NOTES.echo);
    this.measureNote = el("div", "tf-c-measure-note");
    this.measureNote.setAttribute("role", "status");
    this.side.appendChild(this.sideTitle);
    this.side.appendChild(this.sideNote);
    this.side.appendChild(this.measureNote);
    this.side.appendChild(this.matrix);
    main.appendChild(this.turns);
    main.appendChild(this.side);
    host.appendChild(this.status);
    host.appendChild(this.lanes);
    host.appendChild(main);
    this.empty();
    var self = this;
    // Arcs follow the marks: redraw when the lanes change size (the tab shown, a resize).
    if (window.ResizeObserver) {
      new ResizeObserver(function () {
        self.drawArcs();
      }).observe(this.lanes);
    }
  }

  Council.prototype.empty = function () {
    clear(this.turns);
    this.turns.appendChild(
      el(
        "p",
        "tf-c-empty",
        "Pick members and a policy, write what you say to them, and press Start: the voices " +
          "take turns, each in its own block."
      )
    );
  };

  Council.prototype.receive = function (raw) {
    if (typeof raw !== "string" || !raw) return;
    var p;
    try {
      p = JSON.parse(raw);
    } catch (e) {
      return;
    }
    if (!p || typeof p !== "object" || p.kind !== "council") return;
    if (p.n != null && p.n === this.last) return;
    this.last = p.n;
    this.render(p);
  };

  Council.prototype.render = function (p) {
    var id = p.id == null ? null : str(p.id);
    if (id !== this.id) {
      this.id = id;
      this.blocks = new Map();
      clear(this.turns);
      if (id == null) this.empty();
    }
    this.host.dataset.state = str(p.state);
    this.host.dataset.council = id || "";
    var members = Array.isArray(p.members) ? p.members : [];
    var voices = p.voices && typeof p.voices === "object" ? p.voices : {};
    var colors = new Map();
    Object.keys(voices).forEach(function (k) {
      colors.set(k, safeColor(voices[k]));
    });
    members.forEach(function (m) {
      if (m && typeof m === "object") colors.set(str(m.name), safeColor(m.color));
    });
    var turns = Array.isArray(p.turns) ? p.turns : [];
    this.drawStatus(p, turns);
    this.drawLanes(members, turns, colors);
    var near = this.turns.scrollHeight - this.turns.scrollTop - this.turns.clientHeight < 80;
    for (var i = 0; i < turns.length; i++) {
      if (turns[i] && typeof turns[i] === "object") this.drawTurn(turns[i], colors);
    }
    if (near) this.turns.scrollTop = this.turns.scrollHeight;
    var shown = NOTES.hasOwnProperty(str(p.shown)) ? str(p.shown) : "echo";
    this.host.dataset.measure = shown;
    this.sideTitle.textContent = "Resonance (" + shown + ")";
    this.sideNote.textContent = NOTES[shown];
    this.measureNote.textContent = str(p.measure_note);
    this.drawMatrix(p.matrix, colors, str(p.unit));
    this.arcData = {
      arcs: Array.isArray(p.arcs) ? p.arcs : [],
      turns: turns,
      colors: colors,
      unit: str(p.unit),
    };
    this.drawArcs();
  };

  /** One SVG path per arc, from the earlier turn's mark to the later one's, bowed upward;
   * stroke width and opacity grow with the weight; its <title> says who draws on whom. */
  Council.prototype.drawArcs = function () {
    var svg = this.arcs;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var d = this.arcData;
    var box = this.lanes.getBoundingClientRect();
    if (!d.arcs.length || !box.width) return;
    svg.setAttribute("width", String(Math.round(box.width)));
    svg.setAttribute("height", String(Math.round(box.height)));
    var speaker = new Map();
    d.turns.forEach(function (t) {
      if (t && num(t.i) != null) speaker.set(t.i, t.voice != null ? str(t.voice) : USER);
    });
    var marks = new Map();
    this.rows.querySelectorAll(".tf-c-mark").forEach(function (m) {
      var r = m.getBoundingClientRect();
      marks.set(Number(m.getAttribute("data-turn")), {
        x: r.left + r.width / 2 - box.left,
        y: r.top + r.height / 2 - box.top,
      });
    });
    var shares = d.unit !== "nats/token";
    var absolute = d.unit === "share"; // echo shares as they are; attention, nats relative
    var top = 0;
    d.arcs.forEach(function (a) {
      if (a && num(a.w) != null) top = Math.max(top, a.w);
    });
    if (!(top > 0)) return;
    d.arcs.forEach(function (a) {
      if (!a || typeof a !== "object") return;
      var to = num(a.to);
      var from = num(a.from);
      var w = num(a.w);
      if (to == null || from == null || w == null || w <= 0) return;
      var p = marks.get(from);
      var q = marks.get(to);
      if (!p || !q) return;
      var k = Math.min(1, absolute ? w : w / top);
      var h = Math.min(40, 10 + Math.abs(q.x - p.x) / 4);
      var path = document.createElementNS(SVG, "path");
      path.setAttribute("class", "tf-c-arc");
      path.setAttribute(
        "d",
        "M" + p.x.toFixed(1) + " " + p.y.toFixed(1) +
          " C" + p.x.toFixed(1) + " " + (p.y - h).toFixed(1) +
          " " + q.x.toFixed(1) + " " + (q.y - h).toFixed(1) +
          " " + q.x.toFixed(1) + " " + q.y.toFixed(1)
      );
      var who = speaker.get(to);
      path.setAttribute("stroke", who === USER ? GREY : d.colors.get(who) || GREY);
      path.setAttribute("stroke-width", (1 + 5 * k).toFixed(2));
      path.setAttribute("stroke-opacity", (0.25 + 0.65 * k).toFixed(3));
      path.setAttribute("fill", "none");
      path.setAttribute("data-to", String(to));
      path.setAttribute("data-from", String(from));
      path.setAttribute("data-w", String(w));
      var title = document.createElementNS(SVG, "title");
      var name = function (v) {
        return v === USER ? "you" : str(v);
      };
      title.textContent =
        name(who) + " (turn " + (to + 1) + ") draws on " + name(speaker.get(from)) +
        " (turn " + (from + 1) + "): " + w.toFixed(2) + (shares ? "" : " nats/token");
      path.appendChild(title);
      svg.appendChild(path);
    });
  };

  Council.prototype.drawStatus = function (p, turns) {
    clear(this.status);
    var n = turns.filter(function (t) {
      return t && t.voice != null && t.source === "model";
    }).length;
    var bits = [str(p.title), str(p.policy), str(p.state), n ? n + " turns" : "", str(p.note)];
    this.status.appendChild(
      el(
        "span",
        "tf-c-state",
        bits
          .filter(function (b) {
            return b;
          })
          .join(" · ")
      )
    );
    if (p.error) this.status.appendChild(el("span", "tf-c-error", "error: " + str(p.error)));
  };

  Council.prototype.drawLanes = function (members, turns, colors) {
    clear(this.rows);
    var names = [];
    members.forEach(function (m) {
      if (m && typeof m === "object") names.push(str(m.name));
    });
    var muted = new Set();
    var where = new Map();
    members.forEach(function (m) {
      if (m && m.muted) muted.add(str(m.name));
      if (m && m.backend) where.set(str(m.name), str(m.backend));
    });
    var hasUser = turns.some(function (t) {
      return t && t.voice == null;
    });
    if (hasUser) names.unshift(USER);
    turns.forEach(function (t) {
      var v = t && t.voice != null ? str(t.voice) : USER;
      if (names.indexOf(v) < 0) names.push(v);
    });
    var cols = Math.max(turns.length, 1);
    var self = this;
    names.forEach(function (name) {
      var lane = el("div", "tf-c-lane");
      lane.setAttribute("data-voice", name);
      if (muted.has(name)) lane.classList.add("tf-c-muted");
      var label = el("span", "tf-c-lane-label", name === USER ? "you" : name);
      label.style.color = name === USER ? GREY : colors.get(name) || GREY;
      if (where.has(name)) {
        label.appendChild(el("span", "tf-c-lane-backend", where.get(name)));
        label.setAttribute("title", name + " speaks through " + where.get(name));
      }
      var track = el("div", "tf-c-track");
      track.style.gridTemplateColumns = "repeat(" + cols + ", 1fr)";
      turns.forEach(function (t) {
        var v = t.voice != null ? str(t.voice) : USER;
        if (v !== name) return;
        var i = num(t.i);
        if (i == null) return;
        var mark = el("button", "tf-c-mark");
        mark.type = "button";
        mark.setAttribute("data-turn", String(i));
        mark.setAttribute("aria-label", "turn " + (i + 1) + ": " + (name === USER ? "you" : name));
        mark.style.gridColumnStart = String(i + 1);
        mark.style.background = name === USER ? GREY : colors.get(name) || GREY;
        if (t.source === "user" && t.voice != null) mark.classList.add("tf-c-written");
        mark.addEventListener("click", function () {
          var b = self.blocks.get(i);
          if (b) b.box.scrollIntoView({ block: "nearest" });
        });
        track.appendChild(mark);
      });
      lane.appendChild(label);
      lane.appendChild(track);
      self.rows.appendChild(lane);
    });
  };

  Council.prototype.drawTurn = function (t, colors) {
    var i = num(t.i);
    if (i == null) return;
    var voice = t.voice != null ? str(t.voice) : USER;
    var text = str(t.text);
    var b = this.blocks.get(i);
    if (!b) {
      if (this.blocks.size === 0) clear(this.turns);
      var box = el("div", "tf-c-turn");
      box.setAttribute("data-turn", String(i));
      box.setAttribute("data-voice", voice);
      var head = el("div", "tf-c-head");
      var label = el("span", "tf-c-label", voice === USER ? "you" : voice);
      var color = voice === USER ? GREY : colors.get(voice) || GREY;
      label.style.color = color;
      box.style.borderLeftColor = color;
      var how = el("span", "tf-c-how");
      head.appendChild(label);
      head.appendChild(how);
      var probs = el("div", "tf-c-probs");
      var body = el("div", "tf-c-text");
      box.appendChild(head);
      box.appendChild(probs);
      box.appendChild(body);
      this.turns.appendChild(box);
      b = { box: box, how: how, probs: probs, body: body, shown: "", probsKey: "" };
      this.blocks.set(i, b);
    }
    b.box.setAttribute("data-by", str(t.by));
    b.box.setAttribute("data-source", str(t.source));
    b.box.setAttribute("data-finish", str(t.finish));
    var interrupted = t.finish === "cancelled" || t.finish === "error";
    b.box.classList.toggle("tf-c-interrupted", interrupted);
    b.box.classList.toggle("tf-c-streaming", !t.finish);
    var how = "";
    if (voice === USER) how = "";
    else if (t.source === "user") how = "written by you";
    else if (t.by === "model") how = "chosen by the model";
    else if (t.by === "forced") how = "forced";
    else if (t.by === "user") how = "your pick";
    else how = str(t.policy);
    if (interrupted) how += (how ? " · " : "") + "interrupted";
    if (b.how.textContent !== how) b.how.textContent = how;
    this.drawProbs(b, t, colors);
    // Text grows while a turn streams: append what is new, as a text node.
    if (text !== b.shown) {
      if (text.indexOf(b.shown) === 0) b.body.appendChild(document.createTextNode(text.slice(b.shown.length)));
      else b.body.textContent = text;
      b.shown = text;
    }
  };

  Council.prototype.drawProbs = function (b, t, colors) {
    var probs = t.probs && typeof t.probs === "object" ? t.probs : {};
    var keys = Object.keys(probs).filter(function (k) {
      return num(probs[k]) != null;
    });
    keys.sort(function (a, c) {
      return probs[c] - probs[a];
    });
    var key = JSON.stringify(
      keys.map(function (k) {
        return [k, probs[k]];
      })
    );
    if (key === b.probsKey) return;
    b.probsKey = key;
    clear(b.probs);
    if (!keys.length) return;
    b.probs.setAttribute("aria-label", "who speaks next: the model's probabilities");
    keys.forEach(function (k) {
      var row = el("span", "tf-c-prob");
      row.setAttribute("data-voice", k);
      var bar = el("span", "tf-c-bar");
      bar.style.width = Math.max(2, Math.round(60 * probs[k])) + "px";
      bar.style.background = colors.get(k) || GREY;
      row.appendChild(bar);
      row.appendChild(el("span", "tf-c-prob-label", k + " " + probs[k].toFixed(2)));
      b.probs.appendChild(row);
    });
  };

  Council.prototype.drawMatrix = function (m, colors, unit) {
    var shares = unit !== "nats/token";
    clear(this.matrix);
    if (!m || !Array.isArray(m.labels) || !Array.isArray(m.values)) return;
    var labels = m.labels.map(str);
    var table = el("table", "tf-c-table");
    var head = el("tr");
    head.appendChild(el("th", "tf-c-corner", "speaks ↓ · from →"));
    labels.forEach(function (l) {
      var th = el("th", "tf-c-col", l === USER ? "you" : l);
      th.setAttribute("scope", "col");
      th.style.color = l === USER ? GREY : colors.get(l) || GREY;
      head.appendChild(th);
    });
    table.appendChild(head);
    labels.forEach(function (row, r) {
      var vals = Array.isArray(m.values[r]) ? m.values[r] : [];
      if (
        !vals.some(function (v) {
          return num(v) != null;
        })
      )
        return;
      var tr = el("tr");
      tr.setAttribute("data-row", row);
      var th = el("th", "tf-c-row", row === USER ? "you" : row);
      th.setAttribute("scope", "row");
      th.style.color = row === USER ? GREY : colors.get(row) || GREY;
      tr.appendChild(th);
      labels.forEach(function (col, c) {
        var v = num(vals[c]);
        var td = el("td", "tf-c-cell", v == null ? "–" : shares ? pct(v) : v.toFixed(2));
        td.setAttribute("data-col", col);
        if (v != null && v > 0)
          td.style.background = "rgba(51, 102, 221, " + Math.min(0.8, v).toFixed(3) + ")";
        else if (v != null && v < 0)
          td.style.background = "rgba(221, 102, 51, " + Math.min(0.8, -v).toFixed(3) + ")";
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    this.matrix.appendChild(table);
  };

  // -- the member list: tick who is in, drag (or ▲ ▼, or Alt+↑/↓) to set the order ----------

  var MEMBERS_BOX = "#council-members textarea, #council-members input";

  function Order(host) {
    this.host = host;
    this.dragging = null;
    clear(host);
    host.appendChild(
      el(
        "div",
        "tf-c-order-title",
        "Members, in speaking order: tick who is in; drag a row, or use ▲ ▼ (or Alt+↑ / Alt+↓)"
      )
    );
    this.list = el("ol", "tf-c-order-list");
    this.list.setAttribute("aria-label", "council members in speaking order");
    host.appendChild(this.list);
    this.live = el("div", "tf-c-order-live");
    this.live.setAttribute("role", "status");
    host.appendChild(this.live);
  }

  Order.prototype.load = function (raw) {
    var p;
    try {
      p = typeof raw === "string" ? JSON.parse(raw) : raw;
    } catch (e) {
      return;
    }
    if (!p || p.kind !== "order" || !Array.isArray(p.voices)) return;
    clear(this.list);
    var self = this;
    p.voices.forEach(function (v) {
      if (v && typeof v === "object") self.list.appendChild(self.row(v));
    });
    this.refresh();
  };

  Order.prototype.row = function (v) {
    var name = str(v.name);
    var self = this;
    var li = el("li", "tf-c-order-row");
    li.setAttribute("data-voice", name);
    li.setAttribute("draggable", "true");
    li.tabIndex = 0;
    var grip = el("span", "tf-c-grip", "⠿");
    grip.setAttribute("aria-hidden", "true");
    var box = document.createElement("input");
    box.type = "checkbox";
    box.className = "tf-c-order-on";
    box.checked = !!v.on;
    box.setAttribute("aria-label", "in the council: " + name);
    box.addEventListener("change", function () {
      self.refresh();
      self.sync();
    });
    var label = el("span", "tf-c-order-name", name);
    label.style.color = safeColor(v.color);
    var be = el("span", "tf-c-order-backend", v.backend);
    var up = el("button", "tf-c-up", "▲");
    up.type = "button";
    up.setAttribute("aria-label", "move " + name + " up");
    var down = el("button", "tf-c-down", "▼");
    down.type = "button";
    down.setAttribute("aria-label", "move " + name + " down");
    up.addEventListener("click", function () {
      self.move(li, -1, up);
    });
    down.addEventListener("click", function () {
      self.move(li, 1, down);
    });
    li.addEventListener("keydown", function (e) {
      if (!e.altKey || (e.key !== "ArrowUp" && e.key !== "ArrowDown")) return;
      e.preventDefault();
      self.move(li, e.key === "ArrowUp" ? -1 : 1, li);
    });
    li.addEventListener("dragstart", function (e) {
      self.dragging = li;
      li.classList.add("tf-c-dragging");
      if (e.dataTransfer) {
        e.dataTransfer.effectAllowed = "move";
        e.dataTransfer.setData("text/plain", name);
      }
    });
    li.addEventListener("dragend", function () {
      li.classList.remove("tf-c-dragging");
      self.dragging = null;
    });
    li.addEventListener("dragover", function (e) {
      if (self.dragging && self.dragging !== li) e.preventDefault();
    });
    li.addEventListener("drop", function (e) {
      var src = self.dragging;
      if (!src || src === li) return;
      e.preventDefault();
      var r = li.getBoundingClientRect();
      var after = e.clientY > r.top + r.height / 2;
      self.list.insertBefore(src, after ? li.nextSibling : li);
      self.dragging = null;
      self.changed(src);
    });
    li.appendChild(grip);
    li.appendChild(box);
    li.appendChild(label);
    li.appendChild(be);
    li.appendChild(up);
    li.appendChild(down);
    return li;
  };

  Order.prototype.move = function (li, by, focus) {
    var to = by < 0 ? li.previousElementSibling : li.nextElementSibling;
    if (!to) return;
    this.list.insertBefore(li, by < 0 ? to : to.nextSibling);
    if (focus) focus.focus();
    this.changed(li);
  };

  Order.prototype.changed = function (li) {
    this.refresh();
    this.sync();
    var rows = Array.prototype.slice.call(this.list.children);
    this.live.textContent =
      str(li.getAttribute("data-voice")) + " is now " + (rows.indexOf(li) + 1) + " of " + rows.length;
  };

  /** The ticked members, in list order. */
  Order.prototype.members = function () {
    var out = [];
    Array.prototype.forEach.call(this.list.children, function (li) {
      var box = li.querySelector(".tf-c-order-on");
      if (box && box.checked) out.push(str(li.getAttribute("data-voice")));
    });
    return out;
  };

  Order.prototype.refresh = function () {
    var n = 0;
    Array.prototype.forEach.call(this.list.children, function (li) {
      var box = li.querySelector(".tf-c-order-on");
      var on = !!(box && box.checked);
      li.classList.toggle("tf-c-out", !on);
      li.setAttribute("data-pos", on ? String(++n) : "");
    });
  };

  /** Write the members into the page's hidden box the way typing does (so Gradio sees it). */
  Order.prototype.sync = function () {
    var box = document.querySelector(MEMBERS_BOX);
    if (!box) return;
    var proto = box.tagName === "TEXTAREA" ? window.HTMLTextAreaElement : window.HTMLInputElement;
    var setter = Object.getOwnPropertyDescriptor(proto.prototype, "value").set;
    setter.call(box, JSON.stringify(this.members()));
    box.dispatchEvent(new Event("input", { bubbles: true }));
  };

  window.thoughtformCouncil = {
    orders: [],
    order: function (element, props, watch) {
      var host = element.querySelector(".tf-c-order") || element;
      var o = new Order(host);
      window.thoughtformCouncil.orders.push(o);
      if (props && props.value) o.load(props.value);
      // Redrawn when the server sends a new list (an opened council, another voice set).
      if (watch) {
        watch("value", function () {
          o.load(props.value);
        });
      }
      return o;
    },
    instances: [],
    mount: function (element, props, watch) {
      var host = element.querySelector(".tf-council") || element;
      var c = new Council(host);
      window.thoughtformCouncil.instances.push(c);
      if (props && props.value) c.receive(props.value);
      if (watch) {
        watch("value", function () {
          c.receive(props.value);
        });
      }
      return c;
    },
  };
})();
