/* The loom in the workbench (an add-on of workbench.js; loaded after steer.js, before the views).
 *
 *   Tokens popover: every alternative gets a "branch here" button [data-action=branch]; the
 *   branch forces that token at that index and samples the rest (view-tokens.js calls
 *   loom.popover after drawing the alternatives).
 *   Voice boundaries: under each voice-choice chart (steer.js, the "W" event) "let another voice
 *   speak here" lists the voices with their who-speaks-next probabilities, each a
 *   [data-action=branch-voice] button.
 *   A reply with branches gets a bar: ← k/n → (also Alt+Left / Alt+Right while the message is
 *   focused), a tree map of its branches, and "compare" (the shown branch against its parent,
 *   side by side with the lanes aligned at the fork, and the comparison as text).
 *   Everything goes through the server function tf_loom(action, session, ...) (ui/loom_view.py).
 *
 * Branch texts, voice names and alternatives are model data: textContent only, colours through
 * safeColor (the rules in workbench.js).
 */
(function (TF) {
  "use strict";
  if (!TF || !TF.addon || !TF.util) return;
  var U = TF.util;
  var el = U.el, str = U.str, num = U.num;

  function btn(cls, text, action) {
    var b = el("button", cls, text);
    b.type = "button";
    if (action) b.dataset.action = action;
    return b;
  }

  function pct(p) {
    var v = num(p);
    return v == null ? "–" : (v * 100).toFixed(1) + "%";
  }

  function Loom(wb) {
    this.wb = wb;
    this.fams = new Map(); // root message id -> {root, members}
    this.shown = new Map(); // root message id -> index of the member shown
    var self = this;
    wb.on("R", function () {
      self.fams = new Map();
      self.shown = new Map();
    });
    wb.on("N", function () {
      self.refreshSoon();
    });
    wb.on("W", function (e) {
      self.voiceChoice(e);
    });
  }

  Loom.prototype.call = function (args) {
    var server = this.wb.server;
    if (!server || !server.tf_loom || !this.wb.sid) return Promise.resolve(null);
    var host = this.wb.host;
    host.dataset.loomBusy = String((parseInt(host.dataset.loomBusy || "0", 10) || 0) + 1);
    return server.tf_loom.apply(server, args).then(
      function (res) {
        return res && typeof res === "object" ? res : null;
      },
      function (e) {
        console.error("thoughtform loom:", e);
        return { ok: false, error: "the server did not answer" };
      }
    ).then(function (res) {
      var n = (parseInt(host.dataset.loomBusy || "1", 10) || 1) - 1;
      if (n > 0) host.dataset.loomBusy = String(n);
      else delete host.dataset.loomBusy;
      if (res && !res.ok && res.error) host.dataset.loomError = str(res.error).slice(0, 300);
      else if (res && res.ok) delete host.dataset.loomError;
      return res;
    });
  };

  /** After a session is shown: ask which replies have branches and draw their bars. */
  Loom.prototype.refreshSoon = function () {
    var self = this;
    clearTimeout(this.timer);
    this.timer = setTimeout(function () {
      var sid = self.wb.sid;
      self.call(["families", sid]).then(function (res) {
        if (!res || !res.ok || self.wb.sid !== sid) return;
        Object.keys(res.families || {}).forEach(function (mid) {
          self.call(["family", sid, parseInt(mid, 10)]).then(function (f) {
            if (f && f.ok && self.wb.sid === sid) self.setFamily(f, null);
          });
        });
      });
    }, 50);
  };

  Loom.prototype.msgEl = function (mid) {
    return this.wb.host.querySelector('.tf-chat .tf-msg[data-msg="' + String(parseInt(mid, 10)) + '"]');
  };

  // -- branching -----------------------------------------------------------------------------

  Loom.prototype.branch = function (mid, fork, where) {
    var self = this;
    var sid = this.wb.sid;
    var note = where ? where.querySelector(".tf-loom-note") : null;
    if (where && !note) {
      note = el("p", "tf-loom-note");
      where.appendChild(note);
    }
    if (note) note.textContent = "branching…";
    return this.call(["branch", sid, mid, fork, 1]).then(function (res) {
      if (self.wb.sid !== sid) return;
      if (!res || !res.ok) {
        if (note) note.textContent = "branch failed: " + str(res && res.error);
        return;
      }
      if (note) note.textContent = "branched: see the reply";
      var kids = Array.isArray(res.children) ? res.children : [];
      self.setFamily(res, kids.length ? kids[kids.length - 1] : null);
    });
  };

  /** The tokens popover: a "branch here" button on every alternative row. */
  Loom.prototype.popover = function (pop, table, alts, rec, span) {
    var self = this;
    var box = span && span.closest ? span.closest(".tf-tokmsg") : null;
    if (!box || !table) return;
    var mid = parseInt(box.dataset.msg, 10);
    var first = box.querySelector(".tf-tok");
    var base = first ? parseInt(first.dataset.tokenIndex, 10) : NaN;
    if (isNaN(mid) || isNaN(base) || mid < 0) return;
    var at = rec.i - base;
    var rows = table.querySelectorAll("tr.tf-alt");
    for (var k = 0; k < rows.length && k < alts.length; k++) {
      (function (alt) {
        var td = el("td", "tf-alt-branch");
        var b = btn("tf-loom-btn", "branch here", "branch");
        b.title = "Force this token here and let the model go on from it";
        b.addEventListener("click", function (e) {
          e.stopPropagation();
          self.branch(mid, { at: at, alt: alt }, pop);
        });
        td.appendChild(b);
        rows[k].appendChild(td);
      })(str(alts[k][0]));
    }
  };

  /** A voice boundary: "let another voice speak here" under its chart. */
  Loom.prototype.voiceChoice = function (e) {
    var chat = this.wb.views.chat;
    var m = chat && chat.msg;
    var tok = num(e[1]);
    if (!m || tok == null || m.role !== "assistant") return;
    var boxes = m.el.querySelectorAll(".tf-choice");
    var box = boxes.length ? boxes[boxes.length - 1] : null;
    var chart = box && box.querySelector(".tf-choice-chart");
    if (!chart || chart.querySelector(".tf-loom-voices")) return;
    var self = this;
    var mid = m.id;
    var at = tok - (num(m.base) || 0);
    var pairs = (Array.isArray(e[2]) ? e[2] : []).filter(function (p) {
      return Array.isArray(p) && num(p[1]) != null;
    });
    pairs.sort(function (a, b) { return b[1] - a[1]; });
    var sec = el("div", "tf-loom-voices");
    sec.appendChild(el("p", "tf-loom-head", "let another voice speak here"));
    pairs.forEach(function (p) {
      var name = str(p[0]);
      var b = btn("tf-loom-btn", name + " " + pct(p[1]), "branch-voice");
      b.dataset.voice = name;
      b.style.borderColor = U.safeColor(self.wb.colorOf(name));
      b.addEventListener("click", function () {
        self.branch(mid, { at: at, voice: name }, sec);
      });
      sec.appendChild(b);
    });
    chart.appendChild(sec);
  };

  // -- siblings, tree, compare ---------------------------------------------------------------

  Loom.prototype.setFamily = function (f, showId) {
    var root = num(f.root);
    var members = Array.isArray(f.members) ? f.members : [];
    if (root == null || !members.length) return;
    this.fams.set(root, { root: root, members: members });
    var k = this.shown.get(root) || 0;
    if (showId != null) {
      for (var i = 0; i < members.length; i++) if (num(members[i].id) === num(showId)) k = i;
    }
    this.draw(root);
    this.show(root, Math.min(k, members.length - 1));
  };

  Loom.prototype.draw = function (root) {
    var m = this.msgEl(root);
    var f = this.fams.get(root);
    if (!m || !f) return;
    var self = this;
    var bar = m.querySelector(":scope > .tf-loom");
    if (bar) bar.parentNode.removeChild(bar);
    bar = el("div", "tf-loom");
    var prev = btn("tf-loom-nav", "←", "loom-prev");
    prev.setAttribute("aria-label", "previous branch (Alt+Left)");
    var pos = el("span", "tf-loom-pos", "");
    var next = btn("tf-loom-nav", "→", "loom-next");
    next.setAttribute("aria-label", "next branch (Alt+Right)");
    var treeB = btn("tf-loom-btn", "tree", "loom-tree");
    var cmpB = btn("tf-loom-btn", "compare", "loom-compare");
    prev.addEventListener("click", function () { self.step(root, -1); });
    next.addEventListener("click", function () { self.step(root, 1); });
    var tree = el("ol", "tf-loom-tree");
    tree.hidden = true;
    treeB.setAttribute("aria-expanded", "false");
    treeB.addEventListener("click", function () {
      tree.hidden = !tree.hidden;
      treeB.setAttribute("aria-expanded", tree.hidden ? "false" : "true");
    });
    f.members.forEach(function (mem, i) {
      var li = el("li", "tf-loom-node");
      li.style.paddingLeft = (Math.min(8, num(mem.depth) || 0) * 14) + "px";
      var label = i === 0 ? "original" : "branch " + str(mem.label);
      var go = btn("tf-loom-go", (i + 1) + ". " + label, "loom-go");
      go.dataset.k = String(i);
      go.addEventListener("click", function () { self.show(root, i); });
      li.appendChild(go);
      tree.appendChild(li);
    });
    cmpB.addEventListener("click", function () { self.compare(root); });
    [prev, pos, next, treeB, cmpB].forEach(function (x) { bar.appendChild(x); });
    bar.appendChild(tree);
    var head = m.querySelector(":scope > .tf-msg-head");
    if (head && head.nextSibling) m.insertBefore(bar, head.nextSibling);
    else m.appendChild(bar);
    if (!m.dataset.loomKeys) {
      m.dataset.loomKeys = "1";
      m.tabIndex = 0;
      m.addEventListener("keydown", function (e) {
        if (!e.altKey || (e.key !== "ArrowLeft" && e.key !== "ArrowRight")) return;
        e.preventDefault();
        self.step(root, e.key === "ArrowLeft" ? -1 : 1);
      });
    }
  };

  Loom.prototype.step = function (root, d) {
    var f = this.fams.get(root);
    if (!f) return;
    var n = f.members.length;
    this.show(root, ((this.shown.get(root) || 0) + d + n) % n);
  };

  function blocksOf(segs, fromChar) {
    var out = el("div", "tf-loom-blocks");
    (Array.isArray(segs) ? segs : []).forEach(function (s) {
      if (!Array.isArray(s)) return;
      if (fromChar != null && (num(s[3]) || 0) + str(s[2]).length < fromChar) return;
      var b = el("div", "tf-loom-block");
      b.dataset.voice = str(s[0]);
      b.style.borderLeftColor = U.safeColor(str(s[1]));
      b.appendChild(el("span", "tf-loom-voice", str(s[0])));
      b.appendChild(el("div", "tf-loom-text", str(s[2])));
      out.appendChild(b);
    });
    return out;
  }

  Loom.prototype.show = function (root, k) {
    var m = this.msgEl(root);
    var f = this.fams.get(root);
    if (!m || !f) return;
    this.shown.set(root, k);
    m.dataset.loomShown = String(k);
    var pos = m.querySelector(".tf-loom-pos");
    if (pos) pos.textContent = (k + 1) + "/" + f.members.length;
    m.querySelectorAll(".tf-loom-go").forEach(function (g) {
      g.setAttribute("aria-current", g.dataset.k === String(k) ? "true" : "false");
    });
    var alt = m.querySelector(":scope > .tf-loom-alt");
    if (alt) alt.parentNode.removeChild(alt);
    var keep = { "tf-msg-head": 1, "tf-loom": 1, "tf-loom-cmp": 1 };
    Array.prototype.forEach.call(m.children, function (c) {
      var mine = false;
      for (var cls in keep) if (c.classList.contains(cls)) mine = true;
      if (!mine) c.classList.toggle("tf-loom-off", k !== 0);
    });
    if (k === 0) return;
    var mem = f.members[k];
    alt = el("div", "tf-loom-alt");
    alt.dataset.msg = String(num(mem.id));
    alt.appendChild(el("p", "tf-loom-label", "branch " + str(mem.label)));
    alt.appendChild(blocksOf(mem.segments, null));
    var bar = m.querySelector(":scope > .tf-loom");
    if (bar && bar.nextSibling) m.insertBefore(alt, bar.nextSibling);
    else m.appendChild(alt);
  };

  Loom.prototype.compare = function (root) {
    var f = this.fams.get(root);
    var m = this.msgEl(root);
    if (!f || !m || f.members.length < 2) return;
    var k = this.shown.get(root) || 0;
    var b = f.members[k === 0 ? 1 : k];
    var a = f.members[0];
    for (var i = 0; i < f.members.length; i++) if (num(f.members[i].id) === num(b.parent)) a = f.members[i];
    var self = this;
    var sid = this.wb.sid;
    this.call(["compare", sid, num(a.id), num(b.id)]).then(function (res) {
      if (!res || self.wb.sid !== sid) return;
      var old = m.querySelector(":scope > .tf-loom-cmp");
      if (old) old.parentNode.removeChild(old);
      var box = el("div", "tf-loom-cmp");
      var x = btn("tf-loom-btn", "close", "loom-close");
      x.addEventListener("click", function () { box.parentNode.removeChild(box); });
      box.appendChild(x);
      if (!res.ok) {
        box.appendChild(el("p", "tf-loom-note", "compare failed: " + str(res.error)));
        m.appendChild(box);
        return;
      }
      box.appendChild(el("pre", "tf-loom-summary", summary(res.compare || {})));
      var lanes = el("div", "tf-loom-lanes");
      [["A", res.a, a], ["B", res.b, b]].forEach(function (t) {
        var lane = el("div", "tf-loom-lane");
        lane.dataset.lane = t[0];
        var which = t[2] === f.members[0] ? "original" : "branch " + str(t[2].label);
        lane.appendChild(el("p", "tf-loom-head", t[0] + ": " + which));
        var fc = num(t[1] && t[1].fork_char) || 0;
        // Lanes start at the fork: the shared prefix is the same in both (its tail shown).
        lane.appendChild(el("p", "tf-loom-prefix", "… " + str(res.prefix).slice(-60)));
        lane.appendChild(el("div", "tf-loom-fork", "fork at token " + str((res.compare || {}).fork)));
        lane.appendChild(blocksOf(t[1] && t[1].segments, fc));
        lanes.appendChild(lane);
      });
      box.appendChild(lanes);
      m.appendChild(box);
    });
  };

  function statsLines(tag, side) {
    var out = [];
    var st = (side && side.stats) || {};
    Object.keys(st).forEach(function (v) {
      var s = st[v] || {};
      out.push("  " + tag + " " + v + ": " + str(s.tokens) + " tokens, surprisal " +
        (s.mean_surprisal == null ? "–" : Number(s.mean_surprisal).toFixed(2)) + " bits, entropy " +
        (s.mean_entropy == null ? "–" : Number(s.mean_entropy).toFixed(2)));
    });
    return out;
  }

  /** The comparison as plain text (shown in a <pre> through textContent). */
  function summary(c) {
    var a = c.a || {}, b = c.b || {};
    var seq = function (x) { return (Array.isArray(x.voices) ? x.voices : []).map(str).join(" → ") || "(none)"; };
    var list = function (x) { return (Array.isArray(x) ? x : []).map(str).join(", ") || "none"; };
    var lines = [
      "fork at token " + str(c.fork),
      "A voices: " + seq(a),
      "B voices: " + seq(b),
      "appeared in B: " + list(c.appeared) + " · vanished: " + list(c.vanished) +
        " · reordered: " + (c.reordered ? "yes" : "no"),
      "p(A's forked token) under B: " + pct(a.forked_token_p_under_b) +
        " · p(B's forked token) under A: " + pct(b.forked_token_p_under_a),
      "per voice after the fork:",
    ];
    lines = lines.concat(statsLines("A", a), statsLines("B", b));
    var rc = c.reconverge;
    lines.push(rc && typeof rc === "object"
      ? "re-converge: \"" + str(rc.words) + "\" (A word " + str(rc.a_word) + ", B word " + str(rc.b_word) + ")"
      : "re-converge: never (no 4 words in a row again)");
    return lines.join("\n");
  }

  TF.addon(function (wb) {
    wb.loom = new Loom(wb);
  });
})(window.thoughtform);
