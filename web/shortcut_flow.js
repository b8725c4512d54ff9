// Train Shortcut and Shortcut LoRA Loader end with their recipe (the calibration table, the loaded LoRA's
// recipe) as the node's `text` output. The frontend shows a node's progress text while it runs, but newer
// frontends (1.58) clear it when the run ends: the result is kept here, in the node, until the next run.
import { app } from "../../scripts/app.js";

const NODES = new Set(["TrainShortcut", "ShortcutLoRALoader"]);
const RESULT = "shortcut_flow_result";
const PROGRESS_TEXT = "$$node-text-preview"; // the frontend's own progress text, replaced by the result

function removeWidget(node, name) {
  const index = (node.widgets || []).findIndex((w) => w.name === name);
  if (index > -1) {
    node.widgets[index].onRemove?.();
    node.widgets.splice(index, 1);
  }
}

function showResult(node, text) {
  removeWidget(node, PROGRESS_TEXT);
  let widget = (node.widgets || []).find((w) => w.name === RESULT);
  if (!widget) {
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.className = "comfy-multiline-input";
    area.style.cssText = "width: 100%; font-family: monospace; font-size: 10px; white-space: pre; resize: none;";
    widget = node.addDOMWidget(RESULT, "shortcut_flow_text", area, {
      serialize: false,
      getValue: () => area.value,
      setValue: (value) => { area.value = value; },
      getMinHeight: () => 120,
    });
    widget.serialize = false;
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "shortcut-flow.result-text",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text || []).join("\n");
      if (text) showResult(this, text);
    };
  },
});
