// The dashboard's entry: the API key form and a hash router over three views.

import { api, getKey, setKey } from "./api.js";
import { h, replace } from "./dom.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { submitView } from "./submit.js";

let current = null;

function route() {
  current?.stop();
  current = null;
  const view = document.getElementById("view");
  const hash = location.hash || "#/jobs";
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", hash.startsWith(`#/${a.dataset.nav}`));
  }
  if (!getKey()) {
    replace(view, h("section", { class: "notice" },
      h("h1", {}, "Enter an API key"),
      h("p", {}, "Every call this page makes to the tuneq API carries your key. `make up` prints the admin's key on its "
        + "first start and keeps it in var/admin.key; an admin makes more with `tuneq admin create-key NAME`."),
      h("p", {}, "The key stays in this browser's local storage until you clear it.")));
    return;
  }
  const m = hash.match(/^#\/jobs\/([^/]+)$/);
  if (m) current = jobView(view, decodeURIComponent(m[1]));
  else if (hash === "#/new") current = submitView(view);
  else current = jobsView(view);
}

function showKeyState(text, cls = "muted") {
  const el = document.getElementById("key-state");
  el.className = cls;
  replace(el, text);
}

async function checkKey() {
  const key = getKey();
  if (!key) return showKeyState("no key");
  try {
    await api("/v1/models");
    // The part before the secret is the key's id; the secret itself is never shown again.
    showKeyState(`using ${key.split("_").slice(0, 2).join("_")}_…`, "ok");
  } catch (err) {
    showKeyState(`key refused: ${err.message}`, "error");
  }
}

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("api-key");
  setKey(input.value.trim());
  input.value = "";
  checkKey();
  route();
});

window.addEventListener("hashchange", route);
checkKey();
route();
