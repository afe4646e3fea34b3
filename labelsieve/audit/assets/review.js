/* audit.html review tool (labelsieve/audit/assets/review.js, inlined by labelsieve.audit.html).
 *
 * Reads the audit rows embedded in <script id="ls-data" type="application/json">, lets a person filter,
 * sort and decide rows with the keyboard, keeps every decision in localStorage under a key made of the
 * audit's input hash and creation time (a second audit never overwrites the first one's decisions, and
 * offers to import them), and downloads the decisions as a reviews CSV (path, given_label,
 * suggested_label, review, digest, audit_id) that `labelsieve apply --reviews` and `train --clean --reviews`
 * read. The CSV is the one dialect labelsieve writes and reads: comma-separated, a field quoted (RFC 4180) when it
 * holds a quote, comma, semicolon, tab or line break or starts or ends with a space, and a cell a spreadsheet would
 * run or convert given a leading ' by the same rule as audit.csv (the patterns come from Python, D.csv); the import
 * parses that dialect (or the ; / tab a spreadsheet saved it with) and removes exactly that '.
 * No network, no dependencies.
 */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("ls-data").textContent);
  var R = D.rows, N = R.path.length, C = D.classes, M = D.members || [];
  var PREFIX = "labelsieve-review:v1:";
  var KEY = PREFIX + D.id.key;
  var byPath = new Map();
  for (var i = 0; i < N; i++) byPath.set(R.path[i], i);
  var classIndex = new Map();
  var classLower = new Map();
  C.forEach(function (c, k) { classIndex.set(c, k); classLower.set(c.toLowerCase(), c); });
  var DIG = R.digest || [];            // each row's image digest ("b2-…"; absent for an audit of features)
  var AID = D.id.audit_id || "";
  var dec = R.review.slice();          // the decision per embedded row ("" = none)
  var storageOK = true, storageMsg = "";
  var unsaved = 0;                     // decisions changed since the last download
  var view = [];                       // row indices shown, in order
  var cur = 0;                         // position of the focused row in `view`
  var page = 0;
  var $ = function (id) { return document.getElementById(id); };

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (ch) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[ch];
    });
  }
  function fmt(x, d) {
    if (x === null || x === undefined) return "–";
    d = d === undefined ? 3 : d;
    return x > 0 && x < Math.pow(10, -d) ? "<" + Math.pow(10, -d).toFixed(d) : Number(x).toFixed(d);
  }
  function num(n) { return Number(n).toLocaleString("en-US"); }
  function sugg(i) { return R.sugg[i] >= 0 ? C[R.sugg[i]] : ""; }
  function given(i) { return C[R.given[i]]; }
  function readable(i) { return D.issues[R.issue[i]] !== "unreadable"; }
  function toast(msg) {
    var t = $("ls-toast"); t.textContent = msg; t.classList.add("show");
    clearTimeout(toast.timer); toast.timer = setTimeout(function () { t.classList.remove("show"); }, 1800);
  }

  /* ---- decisions: meaning, storage ---- */
  function kind(v) {
    var low = v.trim().toLowerCase();
    if (low === "keep" || low === "drop") return low;
    if (low === "relabel" || low.indexOf("relabel:") === 0 || /^relabel\s*:/.test(low)) return "relabel";
    return v ? "other" : "";
  }
  function target(i, v) {        // the class a relabel decision gives row i
    var low = v.trim().toLowerCase();
    if (low === "relabel") return sugg(i);
    var t = v.slice(v.indexOf(":") + 1).trim();
    return classIndex.has(t) ? t : (classLower.get(t.toLowerCase()) || t);
  }
  function describe(i) {
    var v = dec[i], k = kind(v);
    if (k === "keep") return "keep " + given(i);
    if (k === "drop") return "drop";
    if (k === "relabel") return "relabel → " + target(i, v);
    return v;
  }
  function store() {
    if (!storageOK) return;
    var changed = {};
    for (var i = 0; i < N; i++) if (dec[i] !== R.review[i]) changed[R.path[i]] = dec[i];
    var digests = {};
    Object.keys(changed).forEach(function (p) { var i = byPath.get(p); if (DIG[i]) digests[p] = DIG[i]; });
    var rec = {version: 1, input_hash: D.id.input_hash, created: D.id.created, title: D.id.title, audit_id: AID,
               updated: new Date().toISOString(), decisions: changed, digests: digests};
    try { localStorage.setItem(KEY, JSON.stringify(rec)); }
    catch (e) { storageOK = false; storageMsg = "This browser did not keep the decisions (" + e.name + "): " +
                "download the reviews CSV before closing the page."; banner(); }
  }
  function restore() {
    var raw;
    try { raw = localStorage.getItem(KEY); }
    catch (e) { storageOK = false; storageMsg = "This browser keeps no local storage for this page (" + e.name +
                "): decisions are lost on reload unless you download them."; return 0; }
    if (!raw) return 0;
    var n = 0;
    try {
      var d = JSON.parse(raw).decisions || {};
      Object.keys(d).forEach(function (p) { var i = byPath.get(p); if (i !== undefined) { dec[i] = d[p]; n++; } });
    } catch (e) { storageMsg = "The stored decisions of this audit could not be read (" + e.name + ")."; }
    return n;
  }
  function earlier() {            // decisions other audits left in this browser that fit rows here
    var out = [];
    var keys = [];
    try { for (var k = 0; k < localStorage.length; k++) keys.push(localStorage.key(k)); } catch (e) { return out; }
    keys.forEach(function (key) {
      if (!key || key.indexOf(PREFIX) !== 0 || key === KEY) return;
      try {
        var rec = JSON.parse(localStorage.getItem(key));
        var d = rec.decisions || {}, dg = rec.digests || {}, fits = [];
        Object.keys(d).forEach(function (p) {
          var i = byPath.get(p);
          if (i === undefined || !d[p] || dec[i] || !valid(i, d[p])) return;
          if (dg[p] && DIG[i] && dg[p] !== DIG[i]) return;  // made on another picture at this path
          fits.push([i, d[p]]);
        });
        if (fits.length) out.push({key: key, rec: rec, fits: fits, same: rec.input_hash === D.id.input_hash});
      } catch (e) { /* not ours or damaged: leave it alone */ }
    });
    return out;
  }
  function valid(i, v) {
    var k = kind(v);
    if (k === "keep" || k === "drop") return true;
    if (k !== "relabel") return false;
    var t = target(i, v);
    return t !== "" && classIndex.has(t);
  }
  function decide(i, v) {
    if (dec[i] === v) return;
    dec[i] = v; unsaved++; store(); progress();
  }

  /* ---- filters and sorting ---- */
  function fillSelect(id, opts) {
    var s = $(id);
    s.innerHTML = opts.map(function (o) { return "<option value=\"" + esc(o[0]) + "\">" + esc(o[1]) + "</option>"; }).join("");
  }
  function setupControls() {
    var cls = [["", "all classes"]].concat(C.map(function (c) { return [c, c]; }));
    fillSelect("f-given", cls);
    fillSelect("f-sugg", [["", "any suggestion"]].concat(C.map(function (c) { return [c, c]; })));
    fillSelect("f-issue", [["", "any issue"]].concat(D.issues.map(function (s) { return [s, s || "(none)"]; })));
    var mem = [["", "any"]];
    if (M.length) {
      mem.push(["disagree", "members disagree"], ["all", "all members flag"], ["none", "no member flags"]);
      M.forEach(function (m, k) { mem.push(["on:" + k, m + " flags"], ["off:" + k, m + " does not flag"]); });
    }
    fillSelect("f-members", mem);
    $("f-members-wrap").style.display = M.length ? "" : "none";
    ["f-show", "f-given", "f-sugg", "f-issue", "f-members", "f-sort", "f-size"].forEach(function (id) {
      // leave the keyboard to the review: a focused select would take k, d, r … as option letters
      $(id).addEventListener("change", function (e) { e.target.blur(); refilter(true); });
    });
    $("f-search").addEventListener("input", function () { refilter(true); });
    $("ls-download").addEventListener("click", download);
    if ($("ls-check-go")) $("ls-check-go").addEventListener("click", function () {
      $("f-show").value = "check"; $("f-sort").value = "check"; refilter(true); $("ls-grid").scrollIntoView();
    });
    $("ls-import-file").addEventListener("change", importFile);
    $("ls-help-btn").addEventListener("click", function () { openOverlay("ls-help"); });
    $("pg-prev").addEventListener("click", function () { goPage(page - 1); });
    $("pg-next").addEventListener("click", function () { goPage(page + 1); });
    document.querySelectorAll("table.cm td[data-given]").forEach(function (td) {
      td.addEventListener("click", function () {
        $("f-given").value = td.getAttribute("data-given"); $("f-sugg").value = td.getAttribute("data-suggested");
        if (!classIndex.has($("f-sugg").value)) $("f-sugg").value = "";
        if (!classIndex.has($("f-given").value)) $("f-given").value = "";
        $("f-show").value = "flagged"; refilter(true); $("review").scrollIntoView();
      });
    });
    if (C.length <= 10) {
      $("ls-legend").innerHTML = "Relabel keys: " + C.map(function (c, k) {
        return "<kbd>" + ((k + 1) % 10) + "</kbd> " + esc(c); }).join(" · ");
    }
  }
  function matches(i, f) {
    var flagged = R.flag[i] === 1 && readable(i);
    if (f.show === "todo" && !(flagged && !dec[i])) return false;
    if (f.show === "flagged" && !flagged) return false;
    if (f.show === "check" && !(R.check[i] > 0)) return false;
    if (f.show === "decided" && !dec[i]) return false;
    if (f.show === "undecided" && dec[i]) return false;
    if (f.given !== "" && R.given[i] !== f.given) return false;
    if (f.sugg !== "" && R.sugg[i] !== f.sugg) return false;
    if (f.issue !== "" && R.issue[i] !== f.issue) return false;
    if (f.mem) {
      var bits = R.mflag[i], all = (1 << M.length) - 1;
      if (bits === null || bits === undefined) return false;
      if (f.mem === "disagree" && (bits === 0 || bits === all)) return false;
      if (f.mem === "all" && bits !== all) return false;
      if (f.mem === "none" && bits !== 0) return false;
      if (f.mem.indexOf("on:") === 0 && !(bits & (1 << +f.mem.slice(3)))) return false;
      if (f.mem.indexOf("off:") === 0 && (bits & (1 << +f.mem.slice(4)))) return false;
    }
    if (f.q && R.path[i].toLowerCase().indexOf(f.q) < 0) return false;
    return true;
  }
  function refilter(reset) {
    var f = {show: $("f-show").value, given: $("f-given").value === "" ? "" : classIndex.get($("f-given").value),
             sugg: $("f-sugg").value === "" ? "" : classIndex.get($("f-sugg").value),
             issue: $("f-issue").value === "" ? "" : D.issues.indexOf($("f-issue").value),
             mem: $("f-members").value, q: $("f-search").value.trim().toLowerCase()};
    var keep = view.length ? view[cur] : -1;
    view = [];
    for (var i = 0; i < N; i++) if (matches(i, f)) view.push(i);
    var s = $("f-sort").value;
    var key = {
      rank: function (i) { return R.rank[i]; },
      p_asc: function (i) { return R.p[i] === null ? -1 : R.p[i]; },
      p_desc: function (i) { return R.p[i] === null ? 1 : -R.p[i]; },
      sp_desc: function (i) { return R.sp[i] === null ? 1 : -R.sp[i]; },
      agree_desc: function (i) { return R.agree[i] === null ? 1 : -R.agree[i]; },
      given: function (i) { return R.given[i]; },
      check: function (i) { return R.check[i] > 0 ? R.check[i] : 1e12; }
    }[s] || function (i) { return R.rank[i]; };
    view.sort(function (a, b) { return (key(a) - key(b)) || (R.rank[a] - R.rank[b]); });
    cur = 0;
    if (!reset && keep >= 0) { var at = view.indexOf(keep); if (at >= 0) cur = at; }
    page = Math.floor(cur / pageSize());
    render();
  }
  function pageSize() { return +$("f-size").value; }
  function goPage(p) {
    var pages = Math.max(1, Math.ceil(view.length / pageSize()));
    p = Math.max(0, Math.min(pages - 1, p));
    page = p; cur = Math.min(view.length - 1, p * pageSize()); if (cur < 0) cur = 0;
    render();
  }

  /* ---- rendering ---- */
  function card(i, pos) {
    var k = kind(dec[i]);
    var th = D.thumbs[String(i)];
    var img = !readable(i) ? "<div class=\"ph bad\">unreadable</div>"
      : th ? "<img alt=\"" + esc(R.path[i]) + "\" src=\"" + th + "\">"
      : th === null ? "<div class=\"ph bad\">cannot be decoded</div>"
      : "<div class=\"ph\">no thumbnail<br>(rank " + num(R.rank[i]) + ")</div>";
    var s = sugg(i);
    var mem = "";
    if (M.length && R.mflag[i] !== null) {
      mem = "<div class=\"mem\">" + M.map(function (m, b) {
        var on = R.mflag[i] & (1 << b);
        return "<b class=\"" + (on ? "on" : "off") + "\" title=\"" + esc(m) + (on ? " flags" : " does not flag") +
          "\">" + (on ? "✗" : "✓") + "</b>" + esc(m); }).join(" ") + "</div>";
    }
    var issue = D.issues[R.issue[i]];
    var src = dec[i] && dec[i] === R.review[i] ? " <span class=\"src\">(from audit.csv)</span>" : "";
    return "<div class=\"rc" + (pos === cur ? " cur" : "") + (k ? " d-" + (k === "other" ? "relabel" : k) : "") +
      "\" data-pos=\"" + pos + "\" data-i=\"" + i + "\" title=\"" + esc(R.path[i]) + "\">" +
      "<div class=\"thumb\">" + img + "</div>" +
      "<div>#" + num(R.rank[i]) + " · p_clean " + fmt(R.p[i]) + (issue ? " <span class=\"tag\">" + esc(issue) +
      "</span>" : "") + (R.check[i] > 0 ? " <span class=\"chk\" title=\"row " + R.check[i] +
      " of the check sample\">check " + R.check[i] + "</span>" : "") + "</div>" +
      "<div class=\"lab\"><span class=\"given\">" + esc(given(i)) + "</span> → <span class=\"sugg\">" +
      esc(s || "(none)") + "</span>" + (R.sp[i] !== null ? " (" + fmt(R.sp[i], 2) + ")" : "") + "</div>" + mem +
      "<div class=\"path\">" + esc(R.path[i]) + "</div>" +
      "<div class=\"dec\">" + (dec[i] ? esc(describe(i)) + src : "") + "</div>" +
      "<div class=\"acts\"><button data-act=\"keep\">keep</button><button data-act=\"drop\">drop</button>" +
      (s && s !== given(i) ? "<button data-act=\"relabel\">→ " + esc(s) + "</button>" : "") +
      "<button data-act=\"pick\">class…</button>" + (dec[i] ? "<button data-act=\"clear\">clear</button>" : "") +
      "</div></div>";
  }
  function render() {
    var size = pageSize(), pages = Math.max(1, Math.ceil(view.length / size));
    if (page >= pages) page = pages - 1;
    var start = page * size, end = Math.min(view.length, start + size);
    var html = [];
    for (var p = start; p < end; p++) html.push(card(view[p], p));
    $("ls-grid").innerHTML = html.join("") || "<p class=\"note\">No rows match these filters.</p>";
    $("pg-where").textContent = view.length ? "page " + num(page + 1) + " of " + num(pages) + " · rows " +
      num(start + 1) + "–" + num(end) + " of " + num(view.length) + " shown" : "0 rows";
    $("pg-prev").disabled = page === 0; $("pg-next").disabled = page >= pages - 1;
    progress();
  }
  function rerenderCard(pos) {
    var el = document.querySelector(".rc[data-pos=\"" + pos + "\"]");
    if (!el) return;
    var tmp = document.createElement("div"); tmp.innerHTML = card(view[pos], pos);
    el.replaceWith(tmp.firstChild);
  }
  function focus(pos) {
    if (!view.length) return;
    pos = Math.max(0, Math.min(view.length - 1, pos));
    var size = pageSize();
    if (Math.floor(pos / size) !== page) { page = Math.floor(pos / size); cur = pos; render(); }
    else {
      var old = document.querySelector(".rc.cur"); if (old) old.classList.remove("cur");
      cur = pos;
    }
    var el = document.querySelector(".rc[data-pos=\"" + cur + "\"]");
    if (el) { el.classList.add("cur"); el.scrollIntoView({block: "nearest"}); }
  }
  function progress() {
    var flagged = 0, done = 0, other = 0;
    for (var i = 0; i < N; i++) {
      var f = R.flag[i] === 1 && readable(i);
      if (f) { flagged++; if (dec[i]) done++; } else if (dec[i]) other++;
    }
    checkPanel();
    $("ls-progress-text").textContent = num(done) + " of " + num(flagged) + " flagged reviewed";
    $("ls-progress-bar").style.width = (flagged ? 100 * done / flagged : 0) + "%";
    $("ls-progress-sub").textContent = (other ? num(other) + " other row(s) decided · " : "") +
      (storageOK ? "kept in this browser" : "NOT kept in this browser") +
      (unsaved ? " · " + num(unsaved) + " change(s) since the last download" : "");
  }
  var importNote = "";
  function banner() {
    var box = $("ls-banners"); box.innerHTML = "";
    if (storageMsg) {
      var b = document.createElement("div"); b.className = "banner err"; b.textContent = storageMsg; box.appendChild(b);
    }
    if (importNote) {
      var m = document.createElement("div"); m.className = "banner"; m.id = "ls-import-note"; m.textContent = importNote;
      box.appendChild(m);
    }
    earlier().forEach(function (e) {
      var b = document.createElement("div"); b.className = "banner";
      var when = (e.rec.created || "an earlier audit") + (e.rec.updated ? ", last decision " + e.rec.updated.slice(0, 16).replace("T", " ") : "");
      b.innerHTML = "<span>This browser holds decisions from " + (e.same ? "an earlier audit of the same input" :
        "another audit") + " (" + esc(when) + "): <b>" + num(e.fits.length) + "</b> fit rows here that have no " +
        "decision yet.</span>";
      var imp = document.createElement("button"); imp.textContent = "Import " + num(e.fits.length);
      imp.className = "primary";
      imp.addEventListener("click", function () {
        e.fits.forEach(function (f) { if (!dec[f[0]]) { dec[f[0]] = f[1]; unsaved++; } });
        store(); render(); banner(); toast("Imported " + num(e.fits.length) + " decision(s)");
      });
      var hide = document.createElement("button"); hide.textContent = "Not now";
      hide.addEventListener("click", function () { b.remove(); });
      b.appendChild(imp); b.appendChild(hide); box.appendChild(b);
    });
  }

  /* ---- the check sample's estimate: labelsieve.audit.estimate, ported (same bands, same rules) ---- */
  var DES = D.design || null;
  function wrongOf(i) {               // 1 the given label is wrong, 0 right, NaN undecided (estimate.is_wrong)
    var v = dec[i], k = kind(v);
    if (!v) return NaN;
    if (k === "keep") return 0;
    if (k === "drop") return 1;
    if (k === "relabel") return target(i, v) === given(i) ? 0 : 1;
    return NaN;
  }
  function checkCells() {
    var per = DES.strata.map(function () { return []; });
    for (var i = 0; i < N; i++) if (R.stratum[i] >= 0) per[R.stratum[i]].push(i);
    return DES.strata.map(function (s, h) {
      var rows = per[h].sort(function (a, b) { return R.spos[a] - R.spos[b]; });
      var k = 0;                      // the band's top run of decided rows, cut back to end outside the sample
      while (k < rows.length && R.spos[rows[k]] === k + 1 && !isNaN(wrongOf(rows[k]))) k++;
      while (k > 0 && R.check[rows[k - 1]] > 0) k--;
      var c = {flagged: s.flagged, rows: s.rows, exact: k, exactWrong: 0, m: 0, x: 0};
      for (var j = 0; j < rows.length; j++) {
        var w = wrongOf(rows[j]);
        if (j < k) c.exactWrong += w;
        else if (R.check[rows[j]] > 0 && !isNaN(w)) { c.m++; c.x += w; }
      }
      return c;
    });
  }
  function collapse(cells) {          // a band with rows left and no sample borrows its nearest neighbour's
    var groups = cells.map(function (c) { return [c]; });
    var sum = function (g, key) { return g.reduce(function (a, c) { return a + (key === "left" ? c.rows - c.exact : c[key]); }, 0); };
    var needy = function (g) { return sum(g, "left") > 0 && sum(g, "m") === 0; };
    for (var guard = 0; guard < 1000; guard++) {
      var i = groups.findIndex(needy);
      if (i < 0) break;
      var flag = groups[i][0].flagged, best = -1;
      [true, false].forEach(function (same) {
        if (best >= 0) return;
        var order = groups.map(function (_, j) { return j; }).sort(function (a, b) { return Math.abs(a - i) - Math.abs(b - i) || a - b; });
        order.forEach(function (j) { if (best < 0 && j !== i && sum(groups[j], "m") > 0 && (!same || groups[j][0].flagged === flag)) best = j; });
      });
      if (best < 0) return null;
      groups[best] = best < i ? groups[best].concat(groups[i]) : groups[i].concat(groups[best]);
      groups.splice(i, 1);
    }
    return groups;
  }
  function bandVariance(left, m, x) {   // estimate._band_variance
    if (!m || left <= m) return 0;
    var p = x > 0 && x < m ? x / m : (x + 0.5) / (m + 1);
    return left * left * (1 - m / left) * p * (1 - p) / m;
  }
  function estimate() {               // estimate.estimate_from_reviews, closed form: the CLI's very numbers
    if (!DES) return null;
    var cells = checkCells(), m = cells.reduce(function (a, c) { return a + c.m; }, 0);
    if (!m && cells.some(function (c) { return c.rows > c.exact; })) return {reviewed: 0};
    var groups = collapse(cells);
    if (!groups) return {reviewed: m};
    var point = {true: 0, false: 0}, vari = {true: 0, false: 0}, ok = true;
    groups.forEach(function (g) {
      var left = 0, gm = 0, gx = 0;
      g.forEach(function (c) { left += c.rows - c.exact; gm += c.m; gx += c.x; });
      if (left && !gm) { ok = false; return; }
      var v = bandVariance(left, gm, gx);
      [true, false].forEach(function (f) {
        var part = g.filter(function (c) { return c.flagged === f; });
        if (!part.length) return;
        var share = left ? part.reduce(function (a, c) { return a + c.rows - c.exact; }, 0) / left : 0;
        point[f] += part.reduce(function (a, c) { return a + c.exactWrong; }, 0) + (gm ? left * gx / gm * share : 0);
        vari[f] += v * share * share;
      });
    });
    if (!ok) return {reviewed: m};
    var z = 1.959963984540054, rows = cells.reduce(function (a, c) { return a + c.rows; }, 0) + DES.known_rows;
    var seenW = {true: 0, false: 0}, seenR = {true: 0, false: 0};
    cells.forEach(function (c) { seenW[c.flagged] += c.exactWrong + c.x; seenR[c.flagged] += c.exact - c.exactWrong + c.m - c.x; });
    var wrong = point.true + point.false + DES.known_wrong, sd = Math.sqrt(vari.true + vari.false);
    var lo = Math.max(wrong - z * sd, seenW.true + seenW.false + DES.known_wrong);
    var hi = Math.min(wrong + z * sd, rows - seenR.true - seenR.false - (DES.known_rows - DES.known_wrong));
    var nF = cells.reduce(function (a, c) { return a + (c.flagged ? c.rows : 0); }, 0);
    var found = point.true, missed = point.false, out = {reviewed: m, rows: rows, wrong: wrong,
      rate: rows ? wrong / rows : 0, interval: [lo / rows, hi / rows], precision: null, recall: null};
    var mF = cells.reduce(function (a, c) { return a + (c.flagged ? c.m : 0); }, 0);
    if (nF) {
      var pw = agrestiCoull(found / nF, vari.true / (nF * nF), mF, z);
      out.precision = found / nF;
      out.precisionInterval = [Math.max(pw[0], seenW.true / nF), Math.min(pw[1], (nF - seenR.true) / nF)];
    }
    if (found + missed > 0) {
      var rec = found / (found + missed);
      var sr = Math.sqrt(missed * missed * vari.true + found * found * vari.false) / Math.pow(found + missed, 2);
      out.recall = rec; out.recallInterval = [Math.max(rec - z * sr, 0), Math.min(rec + z * sr, 1)];
    }
    return out;
  }
  function agrestiCoull(p, v, m, z) { // estimate._agresti_coull: on the design's effective sample size
    if (v <= 0) return [p, p];
    var q = Math.min(Math.max(p, 0.5 / (m + 1)), 1 - 0.5 / (m + 1)), n = q * (1 - q) / v, nt = n + z * z;
    var pt = (p * n + z * z / 2) / nt, half = z * Math.sqrt(pt * (1 - pt) / nt);
    return [Math.max(pt - half, 0), Math.min(pt + half, 1)];
  }
  function pct(x) { return (100 * x).toFixed(1) + "%"; }
  function checkPanel() {
    if (!DES || !$("ls-check-est")) return;
    var e = estimate(), k = 0, decided = 0;
    for (var i = 0; i < N; i++) if (R.check[i] > 0) { k++; if (!isNaN(wrongOf(i))) decided++; }
    $("ls-check-go").textContent = decided < k ? "Review the check sample (" + num(k - decided) + " to go)" :
      "Show the check sample";
    var model = DES.model_rate === null || DES.model_rate === undefined ? "" :
      " The model alone says " + pct(DES.model_rate) + (DES.model_interval ? " (" + pct(DES.model_interval[0]) + "–" +
      pct(DES.model_interval[1]) + ", an interval that covers its own fit only)" : "") + ".";
    if (!e || !e.reviewed || e.rate === undefined) {
      var before = DES.reviewed;
      $("ls-check-est").textContent = "Nothing reviewed yet: 0 of " + num(k) + " check rows decided." + (before ?
        " The earlier review's check sample (" + num(before.check_reviewed) + " rows) measured " + pct(before.rate) +
        " wrong labels (95% interval " + pct(before.interval[0]) + "–" + pct(before.interval[1]) + ")." : "");
      $("ls-check-sub").textContent = (before ? "This audit's own sample is drawn from the rows nobody has " +
        "reviewed yet: review it to measure this audit's flags. " : "") + model.trim();
      return;
    }
    $("ls-check-est").textContent = "Wrong labels: " + pct(e.rate) + " (95% interval " + pct(e.interval[0]) + "–" +
      pct(e.interval[1]) + "), about " + num(Math.round(e.wrong)) + " of " + num(e.rows) + " images — from " +
      num(decided) + " of " + num(k) + " check rows reviewed.";
    $("ls-check-sub").textContent = (e.precision !== null ? "Flags: precision " + e.precision.toFixed(2) + " (" +
      e.precisionInterval[0].toFixed(2) + "–" + e.precisionInterval[1].toFixed(2) + ")" : "Flags: none") +
      (e.recall !== null ? ", recall " + e.recall.toFixed(2) + " (" + e.recallInterval[0].toFixed(2) + "–" +
      e.recallInterval[1].toFixed(2) + ")." : ".") + model +
      " The interval is design-based: it holds whatever the model, and narrows as more check rows are decided." +
      widerHint(e, decided, k);
  }
  function widerHint(e, decided, k) {  // estimate.suggested_check_size, on the target width Python passes in
    var width = e.interval[1] - e.interval[0], target = DES.target_width;
    if (decided < k || !k || width <= target) return "";
    var more = Math.ceil(k * Math.pow(width / target, 2) / 25) * 25;
    return " For about ±" + Math.round(50 * target) + " points, re-audit with --reviewed and --check-size " + more +
      " and review that sample.";
  }

  /* ---- CSV in and out: one dialect (see the header of this file) ---- */
  var Q = D.csv, CONV = new RegExp(Q.pattern, "i");
  function convertible(s) {      // labelsieve.core.spreadsheet.is_convertible, rule for rule
    var t = s.replace(/^\s+/, "");
    if (!t || t.length > Q.max_len) return false;
    var f = t.charAt(0);
    if (Q.num_first.indexOf(f) < 0 && (Q.word_first.indexOf(f) < 0 || t.length > Q.word_len)) return false;
    return CONV.test(s);
  }
  function needsQuote(rest) { return rest !== "" && (Q.formula.indexOf(rest.charAt(0)) >= 0 || convertible(rest)); }
  function neutralise(s) { return needsQuote(s.replace(/^'+/, "")) ? "'" + s : s; }      // core.io.neutralise_cell
  function restoreCell(s) {                                                            // core.io.restore_cell
    var rest = s.replace(/^'+/, "");
    return rest.length < s.length && needsQuote(rest) ? s.slice(1) : s;
  }
  function csvCell(s) {
    s = neutralise(String(s));
    return /[",;\t\r\n]|^\s|\s$/.test(s) ? "\"" + s.replace(/"/g, "\"\"") + "\"" : s;
  }
  function download() {
    var rows = [];                    // every decided row, and every check row (its band's size is needed)
    for (var i = 0; i < N; i++) if (dec[i] || R.check[i] > 0) rows.push(i);
    rows.sort(function (a, b) { return R.rank[a] - R.rank[b]; });
    var head = ["path", "given_label", "suggested_label", "review", "digest", "audit_id"];
    if (DES) head = head.concat(["is_noisy", "issue", "check", "stratum", "stratum_pos", "stratum_rows", "stratum_sampled"]);
    var lines = [head.join(",")];
    rows.forEach(function (i) {
      var cells = [R.path[i], given(i), sugg(i), dec[i], DIG[i] || "", AID];
      if (DES) {
        var h = R.stratum[i], st = h >= 0 ? DES.strata[h] : null;
        cells = cells.concat([R.flag[i] === 1 ? "True" : "False", D.issues[R.issue[i]], R.check[i] > 0 ? R.check[i] : "",
          st ? h : "", st ? R.spos[i] : "", st ? st.rows : "", st ? st.sampled : ""]);
      }
      lines.push(cells.map(csvCell).join(","));
    });
    var blob = new Blob([lines.join("\n") + "\n"], {type: "text/csv;charset=utf-8"});
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = D.download_name || "reviews.csv";
    document.body.appendChild(a); a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    var nd = rows.filter(function (i) { return dec[i]; }).length;
    unsaved = 0; progress(); toast("Saved " + num(nd) + " decision(s) to " + a.download);
  }
  function delimiterOf(text) {   // of the header line: the one that gives a path and a review column
    var head = text.split(/\r\n|\n|\r/, 1)[0];
    var found = [",", ";", "\t"].filter(function (d) {
      var h = parseCSV(head, d)[0] || [];
      h = h.map(function (c) { return c.trim().toLowerCase(); });
      return h.indexOf("path") >= 0 && h.indexOf("review") >= 0;
    });
    return found.length ? found[0] : ",";
  }
  function parseCSV(text, delim) {   // RFC 4180 with one delimiter
    var rows = [], row = [], cell = "", q = false, any = false;
    for (var k = 0; k < text.length; k++) {
      var ch = text[k];
      if (q) {
        if (ch === "\"") { if (text[k + 1] === "\"") { cell += "\""; k++; } else q = false; }
        else cell += ch;
      } else if (ch === "\"") { q = true; any = true; }
      else if (ch === delim) { row.push(cell); cell = ""; any = true; }
      else if (ch === "\n" || ch === "\r") {
        if (ch === "\r" && text[k + 1] === "\n") k++;
        row.push(cell); rows.push(row); row = []; cell = ""; any = false;
      } else { cell += ch; any = true; }
    }
    if (any || row.length) { row.push(cell); rows.push(row); }
    return rows;
  }
  function loose(s) { return String(s).normalize("NFC").trim().toLowerCase(); }
  function staleReason(i, g, v, s, d) {   // labelsieve.audit.decisions.stale_reason
    if (d && DIG[i] && d !== DIG[i]) return "another picture now";
    if (!g || g === given(i)) return "";
    var k = kind(v), out = k === "keep" ? g : k === "drop" ? "" :
      (v.trim().toLowerCase() === "relabel" ? (s || sugg(i)) : v.slice(v.indexOf(":") + 1).trim());
    return loose(out) === loose(given(i)) ? "" : "decided on the label " + g + ", now " + given(i);
  }
  function importFile(ev) {
    var file = ev.target.files[0]; if (!file) return;
    file.text().then(function (text) {
      text = text.replace(/^\ufeff/, "");
      var rows = parseCSV(text, delimiterOf(text)).map(function (r) { return r.map(restoreCell); });
      var head = (rows.shift() || []).map(function (h) { return h.trim().toLowerCase(); });
      var col = function (name) { return head.indexOf(name); };
      var pc = col("path"), rc = col("review"), gc = col("given_label"), sc = col("suggested_label"),
          dc = col("digest"), ac = col("audit_id");
      if (pc < 0 || rc < 0) { toast("No path and review columns in " + file.name); return; }
      var n = 0, notHere = 0, invalid = 0, clash = 0, stale = [], other = 0;
      var cell = function (r, c) { return c >= 0 && r[c] !== undefined ? r[c] : ""; };
      rows.forEach(function (r) {
        if (r.length === 1 && r[0] === "") return;
        var v = cell(r, rc).trim();
        if (!v) return;
        var i = byPath.get(cell(r, pc));  // paths are data: byte for byte
        if (i === undefined) { notHere++; return; }
        if (!valid(i, v)) { invalid++; return; }
        var why = staleReason(i, cell(r, gc), v, cell(r, sc), cell(r, dc));
        if (why) { stale.push(R.path[i] + " (" + why + ")"); return; }
        if (cell(r, ac) && AID && cell(r, ac) !== AID) other++;
        if (dec[i] && dec[i] !== v) { clash++; return; }
        if (!dec[i]) { dec[i] = v; n++; unsaved++; }
      });
      store(); render();
      var parts = ["Imported " + num(n) + " decision(s) from " + file.name];
      if (other) parts.push(num(other) + " made on another audit (checked by image)");
      if (clash) parts.push("kept " + num(clash) + " different existing one(s)");
      if (notHere) parts.push("skipped " + num(notHere) + " for paths not on this page");
      if (invalid) parts.push("skipped " + num(invalid) + " that are not decisions for this audit's classes");
      if (stale.length) parts.push("did not use " + num(stale.length) + " made on another row: " +
                                   stale.slice(0, 5).join("; ") + (stale.length > 5 ? " …" : ""));
      importNote = parts.join(", ") + ".";
      banner(); toast(parts[0]);
    });
    ev.target.value = "";
  }

  /* ---- keyboard and clicks ---- */
  function act(a, pos) {
    var i = view[pos];
    if (i === undefined) return;
    if (a === "keep") decide(i, "keep");
    else if (a === "drop") decide(i, "drop");
    else if (a === "relabel") {
      var s = sugg(i);
      if (!s) { toast("No suggestion for this row: press c to choose a class"); return; }
      decide(i, s === given(i) ? "keep" : "relabel:" + s);
    } else if (a === "clear") decide(i, "");
    else if (a === "pick") { openPicker(pos); return; }
    else if (a.indexOf("class:") === 0) {
      var c = a.slice(6); decide(i, c === given(i) ? "keep" : "relabel:" + c);
    }
    rerenderCard(pos);
    if (a !== "clear") focus(pos + 1); else focus(pos);
  }
  var pickPos = -1, pickHi = 0;
  function openPicker(pos) {
    pickPos = pos; pickHi = 0; $("pick-q").value = ""; pickList(); openOverlay("ls-pick"); $("pick-q").focus();
  }
  function pickMatches() {
    var q = $("pick-q").value.trim().toLowerCase();
    return C.filter(function (c) { return c.toLowerCase().indexOf(q) >= 0; });
  }
  function pickList() {
    var m = pickMatches();
    $("pick-list").innerHTML = m.map(function (c, k) {
      return "<li data-c=\"" + esc(c) + "\" class=\"" + (k === pickHi ? "hi" : "") + "\">" + esc(c) + "</li>"; }).join("");
  }
  function openOverlay(id) { $(id).classList.add("open"); }
  function closeOverlays() {
    // Give the focus back before hiding: the browser moves focus out of a hidden input only at its next style
    // update, and a key pressed before that (a fast typist, a loaded machine) would go into the hidden input.
    var a = document.activeElement;
    if (a && a.closest && a.closest(".overlay")) a.blur();
    document.querySelectorAll(".overlay.open").forEach(function (o) { o.classList.remove("open"); });
  }
  function choose(c) { closeOverlays(); if (c !== undefined && pickPos >= 0) act("class:" + c, pickPos); }

  function onKey(e) {
    var open = document.querySelector(".overlay.open");
    if (open) {
      if (e.key === "Escape") { closeOverlays(); e.preventDefault(); }
      else if (open.id === "ls-pick") {
        var m = pickMatches();
        if (e.key === "Enter") { if (m.length) choose(m[Math.min(pickHi, m.length - 1)]); e.preventDefault(); }
        else if (e.key === "ArrowDown") { pickHi = Math.min(m.length - 1, pickHi + 1); pickList(); e.preventDefault(); }
        else if (e.key === "ArrowUp") { pickHi = Math.max(0, pickHi - 1); pickList(); e.preventDefault(); }
      }
      return;
    }
    var t = e.target.tagName;
    if (t === "INPUT" || t === "SELECT" || t === "TEXTAREA") { if (e.key === "Escape") e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var k = e.key, handled = true;
    if (k === "ArrowRight") focus(cur + 1);
    else if (k === "ArrowLeft") focus(cur - 1);
    else if (k === "ArrowDown" || k === "ArrowUp") focus(cur + (k === "ArrowDown" ? 1 : -1) * columns());
    else if (k === "k") act("keep", cur);
    else if (k === "d") act("drop", cur);
    else if (k === "r") act("relabel", cur);
    else if (k === "c") act("pick", cur);
    else if (k === "u" || k === "Backspace" || k === "Delete") act("clear", cur);
    else if (k === "n" || k === "PageDown") goPage(page + 1);
    else if (k === "p" || k === "PageUp") goPage(page - 1);
    else if (k === "?") openOverlay("ls-help");
    else if (/^[0-9]$/.test(k) && C.length <= 10) {
      var idx = k === "0" ? 9 : +k - 1;
      if (idx < C.length) act("class:" + C[idx], cur); else handled = false;
    } else handled = false;
    if (handled) e.preventDefault();
  }
  function columns() {
    var cards = document.querySelectorAll(".rc");
    if (cards.length < 2) return 1;
    var top = cards[0].offsetTop, n = 0;
    for (var k = 0; k < cards.length && cards[k].offsetTop === top; k++) n++;
    return Math.max(1, n);
  }
  document.addEventListener("keydown", onKey);
  document.addEventListener("click", function (e) {
    var b = e.target.closest("button[data-act]");
    var c = e.target.closest(".rc");
    if (b && c) { act(b.getAttribute("data-act"), +c.getAttribute("data-pos")); return; }
    if (c) focus(+c.getAttribute("data-pos"));
    var li = e.target.closest("#pick-list li");
    if (li) choose(li.getAttribute("data-c"));
    if (e.target.classList.contains("overlay")) closeOverlays();
  });
  $("pick-q").addEventListener("input", function () { pickHi = 0; pickList(); });

  // the CSV rules, for tests that hold them to Python's (labelsieve.core.io.neutralise_cell / restore_cell)
  window.labelsieveReviewCSV = {neutralise: neutralise, restore: restoreCell};
  setupControls();
  var restored = restore();
  banner();
  refilter(true);
  document.documentElement.setAttribute("data-review-ready", String(restored));
})();
