(function () {
  'use strict';
  // Every text from the report goes into the page through textContent or an attribute
  // value: nothing from a checkpoint is ever parsed as markup or run as script.
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var T = {KEY: 0, NUMEL: 1, SHAPE: 2, DTYPE: 3, STATUS: 4, SOURCE: 5, FILE_KEY: 6,
           FILE_SHAPE: 7, FILE_DTYPE: 8, STEPS: 9, REASON: 10};

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) { Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); }); }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function human(n) {
    if (n >= 1e6) { return (n / 1e6).toFixed(2) + 'M'; }
    if (n >= 1e3) { return (n / 1e3).toFixed(1) + 'k'; }
    return String(n);
  }
  function shape(s) { return s ? '[' + s.join(', ') + ']' : ''; }

  // categories of the bars and the legend: one per source for what it loaded as is,
  // then every other status
  var present = {};
  data.tensors.forEach(function (t) { present[t[T.STATUS]] = true; });
  var categories = [];
  data.sources.forEach(function (s, i) {
    categories.push({id: 'source-' + i, word: 'loaded', label: 'loaded from ' + s.label,
                     meaning: s.checkpoint, color: s.color});
  });
  data.statuses.forEach(function (st) {
    if (st[0] !== 'loaded' && present[st[0]]) {
      categories.push({id: st[0], word: st[0], label: st[0], meaning: st[1], color: st[2]});
    }
  });
  var catColor = {};
  categories.forEach(function (c) { catColor[c.id] = c.color; });
  function categoryOf(t) {
    return t[T.STATUS] === 'loaded' && t[T.SOURCE] >= 0 ? 'source-' + t[T.SOURCE] : t[T.STATUS];
  }

  // ---------------------------------------------------------------- header
  document.getElementById('title').textContent = data.title;
  var summary = document.getElementById('summary');
  var verdict = el('span', {'class': 'verdict ' + (data.ok ? (data.state === 'dry run' ? 'dry' : 'ok') : 'fail')},
                   data.ok ? (data.state === 'dry run' ? 'dry run: would load' : 'loaded') :
                   (data.state === 'dry run' ? 'dry run: would FAIL' : 'FAILED: the model is unchanged'));
  summary.appendChild(verdict);
  summary.appendChild(document.createTextNode(' ' + data.sources.length + ' source(s), ' +
    data.tensors.length + ' model tensors, ' + human(data.total) + ' values'));

  // ---------------------------------------------------------------- problems
  if (data.problems.length) {
    document.getElementById('problems-section').classList.remove('hidden');
    var ul = document.getElementById('problems');
    data.problems.forEach(function (p) {
      var li = el('li', {'class': 'problem'}, p[0]);
      if (p[1] !== null) {
        li.appendChild(document.createTextNode(' '));
        var a = el('a', {'href': '#', 'class': 'goto', 'data-module': p[1]}, '\u2192 ' + (p[1] || '<model>'));
        a.addEventListener('click', function (ev) { ev.preventDefault(); reveal(p[1]); });
        li.appendChild(a);
      }
      ul.appendChild(li);
    });
  }

  // ---------------------------------------------------------------- sources
  var srcBox = document.getElementById('sources');
  var srcSelect = document.getElementById('source-filter');
  data.sources.forEach(function (s, i) {
    var box = el('section', {'class': 'source', 'data-source': String(i)});
    var h = el('h3');
    h.appendChild(el('span', {'class': 'swatch', 'style': 'background:' + s.color}));
    h.appendChild(el('span', null, s.label));
    box.appendChild(h);
    var dl = el('dl');
    s.facts.forEach(function (f) { dl.appendChild(el('dt', null, f[0])); dl.appendChild(el('dd', null, f[1])); });
    box.appendChild(dl);
    srcBox.appendChild(box);
    srcSelect.appendChild(el('option', {'value': String(i)}, s.label));
  });

  // ---------------------------------------------------------------- legend
  var legend = document.getElementById('legend');
  var shownCats = {};
  categories.forEach(function (c) {
    var lab = el('label', {'title': c.meaning, 'data-category': c.id});
    var box = el('input', {'type': 'checkbox', 'class': 'status-filter', 'value': c.id});
    box.checked = true;
    box.addEventListener('change', function () { apply(true); });
    lab.appendChild(box);
    lab.appendChild(el('span', {'class': 'swatch', 'style': 'background:' + c.color}));
    lab.appendChild(document.createTextNode(' ' + c.label + ' '));
    lab.appendChild(el('span', {'class': 'meaning'}, '(' + c.meaning + ')'));
    legend.appendChild(lab);
  });

  // ---------------------------------------------------------------- the tree
  function node(name, path) { return {name: name, path: path, kids: {}, order: [], tensors: [], total: 0, cats: {}}; }
  var root = node('<model>', '');
  data.tensors.forEach(function (t) {
    var parts = t[T.KEY].split('.');
    var cur = root;
    var trail = [root];
    for (var i = 0; i < parts.length - 1; i++) {
      var path = parts.slice(0, i + 1).join('.');
      if (!Object.prototype.hasOwnProperty.call(cur.kids, parts[i])) {
        cur.kids[parts[i]] = node(parts[i], path);
        cur.order.push(parts[i]);
      }
      cur = cur.kids[parts[i]];
      trail.push(cur);
    }
    cur.tensors.push(t);
    var cat = categoryOf(t);
    trail.forEach(function (n) { n.total += t[T.NUMEL]; n.cats[cat] = (n.cats[cat] || 0) + t[T.NUMEL]; });
  });

  var byPath = {};
  function bar(n) {
    var b = el('span', {'class': 'bar'});
    categories.forEach(function (c) {
      var v = n.cats[c.id];
      if (v) {
        var pct = n.total ? (100 * v / n.total) : 0;
        b.appendChild(el('span', {'style': 'width:' + pct.toFixed(3) + '%;background:' + c.color,
                                  'title': c.label + ': ' + human(v) + ' (' + pct.toFixed(1) + '%)',
                                  'data-category': c.id}));
      }
    });
    return b;
  }
  function render(n, depth) {
    var d = el('details', {'class': 'mod', 'id': 'mod-' + (n.path || '<model>'), 'data-path': n.path,
                           'data-params': String(n.total)});
    Object.keys(n.cats).forEach(function (c) { d.setAttribute('data-n-' + c, String(n.cats[c])); });
    if (depth < 1) { d.open = true; }
    var s = el('summary');
    s.appendChild(el('span', {'class': 'name', 'title': n.path || '<model>'}, n.name));
    s.appendChild(el('span', {'class': 'count'}, human(n.total)));
    s.appendChild(bar(n));
    d.appendChild(s);
    n.order.forEach(function (k) { d.appendChild(render(n.kids[k], depth + 1)); });
    if (n.tensors.length) {
      var tab = el('table', {'class': 'tensors'});
      var head = el('tr');
      ['model key', 'status', 'source', 'checkpoint key', 'checkpoint shape', 'model shape', 'dtype',
       'repair steps', 'why'].forEach(function (h) { head.appendChild(el('th', null, h)); });
      tab.appendChild(head);
      n.tensors.forEach(function (t) {
        var tr = el('tr', {'class': 'tensor', 'data-key': t[T.KEY], 'data-status': t[T.STATUS],
                           'data-source': String(t[T.SOURCE]), 'data-category': categoryOf(t)});
        var sw = el('td');
        sw.appendChild(el('span', {'class': 'swatch', 'style': 'background:' + catColor[categoryOf(t)]}));
        sw.appendChild(document.createTextNode(' ' + t[T.STATUS]));
        tr.appendChild(el('td', {'class': 'key'}, t[T.KEY]));
        tr.appendChild(sw);
        tr.appendChild(el('td', null, t[T.SOURCE] >= 0 ? data.sources[t[T.SOURCE]].label : '-'));
        tr.appendChild(el('td', {'class': 'key'}, t[T.FILE_KEY] || '-'));
        tr.appendChild(el('td', null, shape(t[T.FILE_SHAPE]) || '-'));
        tr.appendChild(el('td', null, shape(t[T.SHAPE])));
        tr.appendChild(el('td', null, t[T.FILE_DTYPE] && t[T.FILE_DTYPE] !== t[T.DTYPE] ?
                                      t[T.FILE_DTYPE] + ' \u2192 ' + t[T.DTYPE] : t[T.DTYPE]));
        tr.appendChild(el('td', null, t[T.STEPS] || '-'));
        tr.appendChild(el('td', null, t[T.REASON] || ''));
        tab.appendChild(tr);
      });
      d.appendChild(tab);
    }
    byPath[n.path] = d;
    return d;
  }
  document.getElementById('tree').appendChild(render(root, 0));

  // ---------------------------------------------------------------- filters
  var search = document.getElementById('search');
  function state() {
    var cats = [];
    document.querySelectorAll('.status-filter').forEach(function (b) { if (b.checked) { cats.push(b.value); } });
    return {cats: cats, source: srcSelect.value, q: search.value.trim().toLowerCase()};
  }
  function apply(write) {
    var st = state();
    var on = {};
    st.cats.forEach(function (c) { on[c] = true; });
    var shown = 0;
    document.querySelectorAll('tr.tensor').forEach(function (tr) {
      var t = tr.getAttribute('data-key').toLowerCase();
      var fk = tr.children[3].textContent.toLowerCase();
      var ok = on[tr.getAttribute('data-category')] &&
               (st.source === '' || tr.getAttribute('data-source') === st.source) &&
               (st.q === '' || t.indexOf(st.q) >= 0 || fk.indexOf(st.q) >= 0);
      tr.classList.toggle('hidden', !ok);
      if (ok) { shown++; }
    });
    // a module is shown while anything under it is
    var mods = Array.prototype.slice.call(document.querySelectorAll('details.mod')).reverse();
    mods.forEach(function (d) {
      var any = d.querySelector(':scope > table > tr.tensor:not(.hidden)') !== null ||
                d.querySelector(':scope > details.mod:not(.hidden)') !== null;
      d.classList.toggle('hidden', !any && d.getAttribute('data-path') !== '');
      if (st.q && any) { d.open = true; }
    });
    document.getElementById('shown').textContent = shown + ' of ' + data.tensors.length + ' tensors shown';
    if (write) {
      var all = st.cats.length === categories.length;
      var parts = [];
      if (!all) { parts.push('status=' + st.cats.map(encodeURIComponent).join(',')); }
      if (st.source !== '') { parts.push('source=' + st.source); }
      if (st.q) { parts.push('q=' + encodeURIComponent(st.q)); }
      history.replaceState(null, '', parts.length ? '#' + parts.join('&') : location.pathname);
    }
  }
  function fromHash() {
    var h = location.hash.replace(/^#/, '');
    if (!h) { return; }
    h.split('&').forEach(function (kv) {
      var i = kv.indexOf('=');
      var k = kv.slice(0, i), v = decodeURIComponent(kv.slice(i + 1));
      if (k === 'status') {
        var want = {};
        v.split(',').forEach(function (c) { want[c] = true; });
        document.querySelectorAll('.status-filter').forEach(function (b) { b.checked = !!want[b.value]; });
      } else if (k === 'source') {
        srcSelect.value = v;
      } else if (k === 'q') {
        search.value = v;
      }
    });
  }
  function reveal(path) {
    var d = byPath[path] || byPath[''];
    for (var p = d; p; p = p.parentElement && p.parentElement.closest('details.mod')) { p.open = true; }
    d.scrollIntoView({block: 'center'});
    d.classList.add('flash');
    setTimeout(function () { d.classList.remove('flash'); }, 1500);
  }
  srcSelect.addEventListener('change', function () { apply(true); });
  search.addEventListener('input', function () { apply(true); });
  document.getElementById('expand').addEventListener('click', function () {
    document.querySelectorAll('details.mod').forEach(function (d) { d.open = true; });
  });
  document.getElementById('collapse').addEventListener('click', function () {
    document.querySelectorAll('details.mod').forEach(function (d) { d.open = d.getAttribute('data-path') === ''; });
  });
  fromHash();
  apply(false);
  document.getElementById('footer').textContent = data.footer;
  document.body.setAttribute('data-ready', '1');
}());
