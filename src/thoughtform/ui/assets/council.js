/* The Council tab's renderer: draws whole council snapshots (JSON from council_view.py) into
 * one lane per member, one block per turn ([data-turn][data-voice]) and the resonance matrix.
 * Model text, voice names and every other string from the server go in through textContent or
 * setAttribute only, never through innerHTML; colours are used only when they are #RRGGBB. */
(function () {
  "use strict";

  var HEX = /^#[0-9a-fA-F]{6}$/;
  var USER = "(user)";
  var GREY = "#777777";

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
    return Math.round(100 * x) + "%";
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
    var main = el("div", "tf-c-main");
    this.turns = el("div", "tf-c-turns");
    this.turns.setAttribute("aria-live", "polite");
    this.side = el("div", "tf-c-side");
    this.matrix = el("div", "tf-c-matrix");
    this.side.appendChild(el("div", "tf-c-side-title", "Resonance (echo)"));
    this.side.appendChild(
      el(
        "div",
        "tf-c-side-note",
        "Row: who speaks. Column: whose words and phrases (first said there) it takes up."
      )
    );
    this.side.appendChild(this.matrix);
    main.appendChild(this.turns);
    main.appendChild(this.side);
    host.appendChild(this.status);
    host.appendChild(this.lanes);
    host.appendChild(main);
    this.empty();
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
    this.drawMatrix(p.matrix, colors);
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
    clear(this.lanes);
    var names = [];
    members.forEach(function (m) {
      if (m && typeof m === "object") names.push(str(m.name));
    });
    var muted = new Set();
    members.forEach(function (m) {
      if (m && m.muted) muted.add(str(m.name));
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
      self.lanes.appendChild(lane);
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

  Council.prototype.drawMatrix = function (m, colors) {
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
        var td = el("td", "tf-c-cell", v == null ? "–" : pct(v));
        td.setAttribute("data-col", col);
        if (v != null) td.style.background = "rgba(51, 102, 221, " + Math.min(0.8, v).toFixed(3) + ")";
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    this.matrix.appendChild(table);
  };

  window.thoughtformCouncil = {
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
