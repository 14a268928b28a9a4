// Live refresh: every element with data-refresh is replaced by what its URL answers,
// every refresh_s seconds (the page's footer says how often).  Pages work without it.
(function () {
  "use strict";
  var regions = document.querySelectorAll("[data-refresh]");
  if (!regions.length || !window.fetch) { return; }
  var seconds = parseFloat(document.body.getAttribute("data-refresh-s") || "5");
  function refresh(region) {
    var url = region.getAttribute("data-refresh");
    if (!url) { return; }
    fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { region.innerHTML = html; region.removeAttribute("data-stale"); })
      .catch(function () { region.setAttribute("data-stale", "true"); });
  }
  window.setInterval(function () {
    if (document.hidden) { return; }
    regions.forEach(refresh);
  }, Math.max(1, seconds) * 1000);
})();
