// thoughtform report: ONE delegated handler shows a token's alternatives in ONE popover.
// Data comes from the JSON blob #tf-data; text is only ever set through textContent.
(function () {
  "use strict";
  var root = document.getElementById("tf-root");
  var pop = document.getElementById("tf-pop");
  var src = document.getElementById("tf-data");
  if (!root || !pop || !src) {
    return;
  }
  var toks = null;
  var shown = null;
  var pinned = false;
  var INVISIBLE = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b\u200e\u200f\u202a-\u202e\u2028\u2029\u2060\u2066-\u2069\ufeff]/g;

  function data() {
    // Parsed on first use so a 50k-token page loads without paying for it.
    if (toks === null) {
      try {
        toks = JSON.parse(src.textContent).tokens || [];
      } catch (e) {
        toks = [];
      }
    }
    return toks;
  }

  function visible(s) {
    if (s === "") {
      return "\u2205 empty";
    }
    return String(s)
      .replace(INVISIBLE, function (c) {
        return "\u27e8U+" + ("000" + c.charCodeAt(0).toString(16).toUpperCase()).slice(-4) + "\u27e9";
      })
      .replace(/ /g, "\u2423")
      .replace(/\n/g, "\u21b5")
      .replace(/\t/g, "\u21e5");
  }

  function pct(lp) {
    if (typeof lp !== "number" || !isFinite(lp)) {
      return "?";
    }
    var p = Math.exp(lp) * 100;
    return (p >= 10 ? p.toFixed(1) : p.toPrecision(2)) + "%";
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) {
      e.className = cls;
    }
    if (text !== undefined) {
      e.textContent = text;
    }
    return e;
  }

  function fill(i, span) {
    var rec = data()[i];
    while (pop.firstChild) {
      pop.removeChild(pop.firstChild);
    }
    if (!rec) {
      pop.appendChild(el("div", "tf-pop-head", "token " + i + ": no data"));
      return;
    }
    var text = rec[0], lp = rec[1], ent = rec[2], alts = rec[3] || [];
    var head = el("div", "tf-pop-head");
    head.appendChild(el("code", "", visible(text)));
    var facts = " p " + pct(lp);
    if (typeof lp === "number") {
      facts += " \u00b7 logprob " + lp.toFixed(3);
    }
    if (typeof ent === "number") {
      facts += " \u00b7 entropy " + ent.toFixed(2);
    }
    facts += " \u00b7 #" + i;
    var block = span.closest("[data-voice]");
    if (block) {
      var v = block.getAttribute("data-voice") || "";
      facts += " \u00b7 " + (v.length > 40 ? v.slice(0, 40) + "\u2026" : v);
    }
    head.appendChild(document.createTextNode(facts));
    pop.appendChild(head);
    if (!alts.length) {
      pop.appendChild(el("div", "", "no alternatives recorded"));
      return;
    }
    var table = el("table");
    for (var k = 0; k < alts.length; k++) {
      var a = alts[k];
      var row = el("tr", a[0] === text ? "tf-chosen" : "");
      var c1 = el("td");
      c1.appendChild(el("code", "", visible(a[0])));
      var c2 = el("td", "tf-barcell");
      var bar = el("div", "tf-bar");
      var p = typeof a[1] === "number" ? Math.exp(a[1]) : 0;
      bar.style.width = Math.max(0, Math.min(100, p * 100)).toFixed(1) + "%";
      c2.appendChild(bar);
      row.appendChild(c1);
      row.appendChild(c2);
      row.appendChild(el("td", "tf-pct", pct(a[1])));
      table.appendChild(row);
    }
    pop.appendChild(table);
  }

  function show(span) {
    var i = parseInt(span.getAttribute("data-token-index"), 10);
    if (shown) {
      shown.classList.remove("tf-on");
    }
    shown = span;
    span.classList.add("tf-on");
    fill(i, span);
    pop.hidden = false;
    var r = span.getBoundingClientRect();
    var sx = window.scrollX, sy = window.scrollY;
    var maxX = sx + document.documentElement.clientWidth - pop.offsetWidth - 8;
    pop.style.left = Math.max(sx + 4, Math.min(r.left + sx, maxX)) + "px";
    pop.style.top = r.bottom + sy + 4 + "px";
  }

  function hide() {
    if (shown) {
      shown.classList.remove("tf-on");
    }
    shown = null;
    pop.hidden = true;
  }

  function onEvent(ev) {
    if (ev.type === "keydown") {
      if (ev.key === "Escape") {
        pinned = false;
        hide();
      }
      return;
    }
    var t = ev.target instanceof Element ? ev.target.closest("[data-token-index]") : null;
    if (ev.type === "click") {
      if (t && !(pinned && shown === t)) {
        pinned = true;
        show(t);
      } else if (!pop.contains(ev.target)) {
        pinned = false;
        hide();
      }
      return;
    }
    if (pinned || !t) {
      return;
    }
    if (ev.type === "mouseover") {
      show(t);
    } else if (!(ev.relatedTarget instanceof Node && t.contains(ev.relatedTarget))) {
      hide();
    }
  }

  root.addEventListener("mouseover", onEvent);
  root.addEventListener("mouseout", onEvent);
  root.addEventListener("click", onEvent);
  document.addEventListener("keydown", onEvent);
})();
