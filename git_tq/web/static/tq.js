// git tq's pages: curves (plotly), and the live parts of `git tq serve` (short polling).
// Page data comes from the JSON block #tq-data; nothing here builds HTML from data:
// text goes in through textContent, and into plotly (which reads a little HTML in
// names) with <, > and & escaped.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("tq-data").textContent);
  const status = document.getElementById("status");
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  function say(text) {
    if (status) status.textContent = text;
  }

  function plotlyText(text) { // plotly reads <br>, <b>, <a> ... in names: show them as text
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function label(job) {
    const params = Object.entries(job.params || {}).map(([k, v]) => k + "=" + v).join(" ");
    return "#" + job.job + (job.tag ? " [" + job.tag + "]" : "") + (params ? " " + params : "");
  }

  function getJSON(url) {
    return fetch(url, {credentials: "same-origin", cache: "no-store"}).then((r) => {
      if (!r.ok) throw new Error(url + ": " + r.status);
      return r.json();
    });
  }

  function getText(url) {
    return fetch(url, {credentials: "same-origin", cache: "no-store"}).then((r) => {
      if (!r.ok) throw new Error(url + ": " + r.status);
      return r.text();
    });
  }

  // Run `step` now and then every `seconds` while it resolves to true.
  function every(seconds, step) {
    let failures = 0;
    function again() {
      step().then((more) => {
        failures = 0;
        say("");
        if (more) setTimeout(again, seconds * 1000);
      }, () => {
        failures += 1;
        say("git tq serve does not answer; retrying");
        setTimeout(again, Math.min(30, seconds * (failures + 1)) * 1000);
      });
    }
    again();
  }

  // --- curves -----------------------------------------------------------------------

  function Curves(section) {
    this.section = section;
    this.plots = section.querySelector(".plots");
    this.axis = section.querySelector(".x-axis");
    this.curves = {jobs: []};
    this.divs = {};
    if (this.axis) this.axis.addEventListener("change", () => this.draw(this.curves));
  }

  Curves.prototype.metrics = function (curves) {
    const names = [];
    for (const job of curves.jobs) {
      for (const name of Object.keys(job.series)) {
        if (!names.includes(name)) names.push(name);
      }
    }
    return names;
  };

  Curves.prototype.draw = function (curves) {
    if (typeof Plotly === "undefined") return;
    this.curves = curves;
    const byTime = this.axis && this.axis.value === "time";
    const names = this.metrics(curves);
    const empty = this.plots.querySelector(".empty");
    if (empty && names.length) empty.remove();
    names.forEach((metric, m) => {
      let div = this.divs[metric];
      if (!div) {
        div = document.createElement("div");
        div.className = "plot";
        div.id = "plot-" + m;
        div.dataset.metric = metric;
        this.plots.appendChild(div);
        this.divs[metric] = div;
      }
      const traces = [];
      const shapes = [];
      curves.jobs.forEach((job, j) => {
        const s = job.series[metric];
        if (!s) return;
        const color = PALETTE[j % PALETTE.length];
        const x = s.points.map((p) => (byTime ? new Date(p[2] * 1000) : p[0]));
        const y = s.points.map((p) => p[1]);
        traces.push({
          type: "scatter", mode: s.points.length > 1 ? "lines" : "markers",
          name: plotlyText(label(job)), x: x, y: y, line: {color: color, width: 1.5},
          marker: {color: color}, customdata: s.points.map((p) => p[3]),
          hovertemplate: "%{fullData.name}<br>" + (byTime ? "%{x}" : "step %{x}") +
            "<br>%{y}<br>attempt %{customdata}<extra></extra>",
        });
        for (const r of job.resumes || []) {
          const at = byTime ? new Date(r.time * 1000) : r.step;
          shapes.push({type: "line", xref: "x", yref: "paper", x0: at, x1: at, y0: 0, y1: 1,
            line: {color: color, width: 1, dash: "dot"}});
        }
      });
      const total = curves.jobs.reduce((n, job) => n + (job.series[metric] ? 1 : 0), 0);
      const layout = {
        title: {text: plotlyText(metric), x: 0.02}, uirevision: metric + (byTime ? "t" : "s"),
        margin: {l: 60, r: 20, t: 40, b: 40}, height: 320, shapes: shapes,
        xaxis: {title: {text: byTime ? "time" : "step"}, type: byTime ? "date" : "linear"},
        showlegend: total > 0,
      };
      Plotly.react(div, traces, layout, {displaylogo: false, responsive: true});
    });
  };

  function liveCurves(section, url) {
    const curves = new Curves(section);
    every(2, () => getJSON(url).then((got) => {
      curves.draw(got);
      return got.jobs.some((job) => ["pending", "running", "stopping"].includes(job.state));
    }));
  }

  // --- the log of a job -------------------------------------------------------------

  function followLog(pre, url, state) {
    let offset = null;
    const KEEP = 512 * 1024;
    every(1, () => getJSON(url + (offset === null ? "" : "?offset=" + offset)).then((got) => {
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      if (offset !== null && got.start !== offset) pre.textContent = "";
      if (got.text) {
        pre.appendChild(document.createTextNode(got.text));
        if (pre.textContent.length > KEEP) pre.textContent = pre.textContent.slice(-KEEP);
      }
      offset = got.end;
      if (atBottom) pre.scrollTop = pre.scrollHeight;
      if (state) {
        state.textContent = got.ended ? (got.stored ? "(the copy kept in git)" : "")
          : "(following)";
      }
      return !got.ended;
    }));
  }

  // --- pages ------------------------------------------------------------------------

  const section = document.querySelector(".curves");
  if (data.kind === "report") {
    new Curves(section).draw(data.curves);
  } else if (data.kind === "job" || data.kind === "compare") {
    liveCurves(section, data.curves);
    if (data.kind === "job") {
      followLog(document.getElementById("log"), data.log, document.getElementById("log-state"));
    }
  } else if (data.kind === "board") {
    const board = document.getElementById("board");
    let first = true;
    every(2, () => {
      if (first) {
        first = false;
        return Promise.resolve(true);
      }
      return getText(data.refresh).then((html) => {
        // Rendered by the server's templates, where every value is escaped.
        board.innerHTML = html;
        return true;
      });
    });
  } else if (data.kind === "jobs") {
    const pick = document.getElementById("pick");
    const button = document.getElementById("compare-button");
    const update = () => {
      button.disabled = !pick.querySelector("input[name=jobs]:checked");
    };
    pick.addEventListener("change", update);
    update();
  }
}());
