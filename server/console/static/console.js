// keyplane console: the only script. Copy buttons (data-copy names the element whose
// text is copied); everything else works without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", () => {
      const source = document.getElementById(button.dataset.copy);
      if (!source) return;
      const text = source.textContent.trim();
      const done = (label) => {
        button.textContent = label;
        setTimeout(() => { button.textContent = "Copy"; }, 2000);
      };
      const select = () => {
        const range = document.createRange();
        range.selectNodeContents(source);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        done("Selected: press Ctrl+C");
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(() => done("Copied"), select);
      } else {
        select();
      }
    });
  }
});
