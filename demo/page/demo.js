// The demo chat page: streams answers from /v1/chat/completions and attaches the feedback widget to each.
(() => {
  const $ = (id) => document.getElementById(id);
  const messagesList = $("messages");
  const prompt = $("prompt");
  const sendButton = $("send");
  const conversation = []; // {role, content} turns, kept in the page only
  let controller = null; // AbortController of the answer being streamed
  // Small chat models (the default SmolLM2-135M) ramble at the API's default temperature of 1.0.
  const TEMPERATURE = 0.3;

  // One anonymous id per browser, so a person's votes are theirs across answers.
  const userId = (() => {
    try {
      let id = localStorage.getItem("feedloop-demo-user");
      if (!id) localStorage.setItem("feedloop-demo-user", (id = "demo-" + crypto.randomUUID().slice(0, 8)));
      return id;
    } catch {
      return "demo-anonymous";
    }
  })();

  async function loadModels() {
    try {
      const res = await fetch("v1/models");
      const names = (await res.json()).data.map((m) => m.id);
      const select = $("model");
      for (const name of names) {
        if (name !== "feedloop") select.append(new Option(name, name));
      }
    } catch {
      // the alias option is already there
    }
  }

  function addMessage(role, text) {
    $("empty").hidden = true;
    const item = document.createElement("li");
    item.className = `message ${role}`;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = text;
    item.append(bubble);
    const footer = document.createElement("div");
    footer.className = "message-footer";
    item.append(footer);
    messagesList.append(item);
    item.scrollIntoView({ block: "end" });
    return { item, bubble, footer };
  }

  // Yields the data of each server-sent event; an event ends at a blank line.
  async function* serverSentEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
    if (data.length) yield data.join("\n");
  }

  function setStreaming(on) {
    sendButton.textContent = on ? "Stop" : "Send";
    sendButton.classList.toggle("stop", on);
    prompt.disabled = on;
    if (!on) prompt.focus();
  }

  function showModel(footer, model, adapter) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.title = "Model asked for \u00b7 adapter that answered";
    badge.textContent = adapter && adapter !== model ? `${model} \u00b7 ${adapter}` : model;
    footer.prepend(badge);
  }

  async function ask(text) {
    conversation.push({ role: "user", content: text });
    addMessage("user", text);
    const view = addMessage("assistant", "");
    view.item.setAttribute("aria-busy", "true");
    view.bubble.classList.add("typing");
    const system = $("system").value.trim();
    const model = $("model").value;
    const messages = (system ? [{ role: "system", content: system }] : []).concat(conversation);
    controller = new AbortController();
    setStreaming(true);
    let answer = "";
    let served = null;
    let adapter = null;
    let feedback = null;
    try {
      const res = await fetch("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({ model, messages, stream: true, user: userId, temperature: TEMPERATURE }),
        signal: controller.signal,
      });
      if (!res.ok) {
        const body = await res.json().catch(() => null);
        throw new Error(body?.error?.message || `The server answered ${res.status}`);
      }
      for await (const data of serverSentEvents(res.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "The answer failed");
        served = chunk.model || served;
        // system_fingerprint names what really answered: the adapter version, or the base model.
        adapter = chunk.adapter || chunk.system_fingerprint || adapter;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          answer += delta;
          view.bubble.textContent = answer;
          view.item.scrollIntoView({ block: "end" });
        }
        if (chunk.feedback) feedback = chunk.feedback;
      }
    } catch (err) {
      if (err.name !== "AbortError") {
        view.item.classList.add("failed");
        view.bubble.textContent = answer ? `${answer}\n\n` : "";
        const note = document.createElement("span");
        note.className = "error-note";
        note.textContent = `Error: ${err.message}`;
        view.bubble.append(note);
      }
    } finally {
      controller = null;
      view.bubble.classList.remove("typing");
      view.item.removeAttribute("aria-busy");
      setStreaming(false);
    }
    if (answer) conversation.push({ role: "assistant", content: answer });
    else conversation.pop(); // nothing came back: let the person ask again
    if (!answer && !view.item.classList.contains("failed")) view.bubble.textContent = "(no answer)";
    if (served) showModel(view.footer, served, adapter);
    if (feedback) {
      view.item.dataset.completionId = feedback.completion_id;
      FeedLoop.attach(view.footer, {
        completionId: feedback.completion_id,
        token: feedback.token,
        user: userId,
        comment: true,
        correction: true,
      });
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    if (controller) return controller.abort();
    const text = prompt.value.trim();
    if (!text) return;
    prompt.value = "";
    prompt.style.height = "";
    ask(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  prompt.addEventListener("input", () => {
    prompt.style.height = "";
    prompt.style.height = `${Math.min(prompt.scrollHeight, 200)}px`;
  });
  $("new-chat").addEventListener("click", () => {
    controller?.abort();
    conversation.length = 0;
    messagesList.replaceChildren();
    $("empty").hidden = false;
    prompt.focus();
  });

  loadModels();
  prompt.focus();
})();
