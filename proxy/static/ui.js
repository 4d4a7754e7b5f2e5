// usage-proxy web pages: links marked data-dialog open their form in a modal <dialog>;
// without JavaScript they open the same form as a page of its own.
"use strict";
for (const opener of document.querySelectorAll("[data-dialog]")) {
  const dialog = document.getElementById(opener.dataset.dialog);
  if (!dialog || typeof dialog.showModal !== "function") continue;
  opener.setAttribute("role", "button");
  opener.setAttribute("aria-haspopup", "dialog");
  const open = (event) => {
    event.preventDefault();
    dialog.showModal();
  };
  opener.addEventListener("click", open);
  opener.addEventListener("keydown", (event) => {
    if (event.key === " ") open(event);
  });
  dialog.addEventListener("close", () => opener.focus());
}
for (const closer of document.querySelectorAll("dialog [data-close]")) {
  closer.addEventListener("click", () => closer.closest("dialog").close());
}
