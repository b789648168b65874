/* Attention view: for one token, slide through layers to see its attention mass per earlier
 * voice segment, its top source positions, and (logit lens) what each layer would have said.
 * Data comes from the server function tf_attention(session, token) on demand, never streamed.
 * See workbench.js for the rules.
 */
(function (TF) {
  "use strict";
  if (!TF || !TF.defineView) return;
  var U = TF.util;
  var el = U.el, str = U.str, num = U.num, visible = U.visible;
  var PICK = "Pick a token (in the Tokens view, or by number).";

  function Attention(wb, box) {
    this.wb = wb;
    this.el = box;
    var self = this;
    var ctl = el("div", "tf-ctl");
    ctl.appendChild(el("span", "tf-ctl-label", "Token"));
    this.tok = el("input", "tf-attn-tok");
    this.tok.type = "number";
    this.tok.min = "0";
    this.tok.value = "0";
    this.tok.setAttribute("aria-label", "token index");
    this.tok.addEventListener("change", function () {
      self.load(parseInt(self.tok.value, 10) || 0);
    });
    ctl.appendChild(this.tok);
    ctl.appendChild(el("span", "tf-ctl-label", "Layer"));
    this.layer = el("input", "tf-attn-layer");
    this.layer.type = "range";
    this.layer.min = "0";
    this.layer.max = "0";
    this.layer.value = "0";
    this.layer.setAttribute("aria-label", "layer");
    this.layer.addEventListener("input", function () {
      self.render();
    });
    ctl.appendChild(this.layer);
    this.layerLabel = el("span", "tf-ctl-info", "");
    ctl.appendChild(this.layerLabel);
    box.appendChild(ctl);
    this.body = el("div", "tf-attn-body", PICK);
    box.appendChild(this.body);
  }

  Attention.prototype.clear = function () {
    this.data = null;
    this.body.textContent = PICK;
    this.layerLabel.textContent = "";
  };

  /** Show token ``i`` (global index in the session). */
  Attention.prototype.open = function (i) {
    this.tok.value = String(i);
    this.load(i);
  };

  Attention.prototype.load = function (i) {
    var self = this;
    var server = this.wb.server;
    this.body.textContent = "Loading…";
    if (!server || !server.tf_attention) {
      this.body.textContent = "Attention is not available here.";
      return;
    }
    server
      .tf_attention(this.wb.sid, i)
      .then(function (res) {
        self.data = res && typeof res === "object" ? res : null;
        var n = self.depth();
        self.layer.max = String(Math.max(0, n - 1));
        if (parseInt(self.layer.value, 10) > n - 1) self.layer.value = String(Math.max(0, n - 1));
        self.render();
      })
      .catch(function () {
        self.body.textContent = "Could not load attention.";
      });
  };

  Attention.prototype.depth = function () {
    var a = this.data;
    if (!a) return 0;
    var nl = Array.isArray(a.layers) ? a.layers.length : 0;
    var nlens = Array.isArray(a.lens) ? a.lens.length : 0;
    return Math.max(nl, nlens);
  };

  function bars(title, rows, label, color) {
    var box = el("div", "tf-bars");
    box.appendChild(el("h4", null, title));
    rows.forEach(function (r) {
      if (!Array.isArray(r)) return;
      var row = el("div", "tf-barrow");
      row.appendChild(el("span", "tf-bar-label", label(r)));
      var bar = el("span", "tf-meter");
      var f = el("span", "tf-fill");
      var w = num(r[3]) || 0;
      f.style.width = Math.round(w * 100) + "%";
      if (color) f.style.backgroundColor = U.safeColor(color(r));
      bar.appendChild(f);
      row.appendChild(bar);
      row.appendChild(el("span", "tf-bar-val", (w * 100).toFixed(1) + "%"));
      row.record = r;
      box.appendChild(row);
    });
    return box;
  }

  Attention.prototype.render = function () {
    var b = this.body;
    U.empty(b);
    var a = this.data;
    if (!a) {
      b.textContent = "No such token.";
      return;
    }
    var layers = Array.isArray(a.layers) ? a.layers : [];
    var lens = Array.isArray(a.lens) ? a.lens : [];
    b.appendChild(el("div", "tf-attn-title", "Token #" + str(a.index) + " " + visible(a.text)));
    var depth = this.depth();
    if (!depth) {
      b.appendChild(el("p", "tf-empty", "No attention or logit lens recorded for this token (use the transformers backend with Attention on in Settings)."));
      this.layerLabel.textContent = "";
      return;
    }
    var li = Math.min(depth - 1, parseInt(this.layer.value, 10) || 0);
    this.layerLabel.textContent = "layer " + li + " / " + (depth - 1);
    var self = this;
    if (layers.length) {
      var L = layers[Math.min(li, layers.length - 1)] || {};
      if (num(L.prompt) != null) b.appendChild(el("div", "tf-attn-prompt", "prompt: " + (L.prompt * 100).toFixed(1) + "%"));
      var segs = bars("Mass per segment", Array.isArray(L.segments) ? L.segments : [], function (r) {
        return str(r[0]);
      }, function (r) {
        return r[2];
      });
      segs.querySelectorAll(".tf-barrow").forEach(function (row) {
        if (row.record[4]) row.title = str(row.record[4]);
      });
      b.appendChild(segs);
      var tops = bars("Top positions", Array.isArray(L.top) ? L.top : [], function (r) {
        return "@" + str(r[0]) + " " + str(r[2]);
      }, null);
      tops.querySelectorAll(".tf-barrow").forEach(function (row) {
        var gi = num(row.record[1]);
        if (gi == null) return;
        row.classList.add("tf-link");
        row.addEventListener("click", function () {
          self.open(gi);
        });
      });
      b.appendChild(tops);
    } else {
      b.appendChild(el("p", "tf-empty", "No attention recorded for this token (Attention off in Settings)."));
    }
    if (lens.length) {
      var box = el("div", "tf-lens");
      box.appendChild(el("h4", null, "Logit lens (each layer's top token)"));
      var list = el("ol", "tf-lens-list");
      list.start = 0;
      lens.forEach(function (t, k) {
        var item = el("li", k === li ? "tf-lens-item tf-lens-cur" : "tf-lens-item");
        item.value = k;
        item.dataset.layer = String(k);
        item.appendChild(el("span", "tf-lens-layer", String(k)));
        item.appendChild(el("code", "tf-lens-tok", visible(str(t)) || "\u2205"));
        list.appendChild(item);
      });
      box.appendChild(list);
      b.appendChild(box);
    }
  };

  TF.defineView({
    id: "attention",
    label: "Attention",
    cls: "tf-attn",
    create: function (wb, box) {
      return new Attention(wb, box);
    },
  });
})(window.thoughtform);
