//! A fake inference server on loopback that speaks the OpenAI
//! (`/v1/chat/completions`) and Ollama (`/api/chat`) wire formats byte for
//! byte as their documentation shows, streaming (chunked SSE, chunked
//! NDJSON) and not, over a raw TCP socket so it can misbehave the way real
//! servers do: a slow head, a stalled or dropped stream, broken JSON.
//!
//! The behaviour is picked by the last message: `"<scenario>x<N> <tag>"`
//! misbehaves the first N times that exact message is seen, then answers
//! normally; `"<scenario> <tag>"` always misbehaves. Scenarios: `normal`,
//! `slowfirst`, `stall`, `drop`, `malformed`, `r429`, `e500`, `bad400`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const ANSWER: [&str; 4] = ["Hello", " there", ", friend", "."];
pub const PROMPT_TOKENS: u64 = 9;

/// A request's path and `Authorization` header.
pub type Head = (String, Option<String>);

#[derive(Clone)]
pub struct FakeLlm {
    pub base_url: String,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    /// While set, every request gets `503` (an outage).
    pub down: Arc<AtomicBool>,
    /// Requests received, for tests that count calls.
    pub requests: Arc<Mutex<Vec<Value>>>,
    /// The path and `Authorization` header of each request.
    pub heads: Arc<Mutex<Vec<Head>>>,
}

impl FakeLlm {
    pub async fn start() -> FakeLlm {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeLlm {
            base_url: format!("http://{}", listener.local_addr().unwrap()),
            seen: Arc::default(),
            down: Arc::default(),
            requests: Arc::default(),
            heads: Arc::default(),
        };
        let server = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let _ = server.serve(socket).await;
                });
            }
        });
        fake
    }

    async fn serve(&self, mut socket: TcpStream) -> std::io::Result<()> {
        let (path, auth, body) = read_request(&mut socket).await?;
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        self.requests.lock().unwrap().push(request.clone());
        self.heads.lock().unwrap().push((path.clone(), auth));
        let generate = path == "/api/generate";
        if self.down.load(Ordering::SeqCst) {
            let body = r#"{"error":{"message":"server overloaded","type":"server_error","param":null,"code":null}}"#;
            return respond(&mut socket, "503 Service Unavailable", &[], body).await;
        }
        let ollama = path.starts_with("/api/");
        let stream = request["stream"].as_bool().unwrap_or(ollama); // Ollama streams by default
        let model = request["model"].as_str().unwrap_or("fake").to_owned();
        let last = request["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .or_else(|| request["prompt"].as_str())
            .unwrap_or("")
            .to_owned();
        let word = last.split_whitespace().next().unwrap_or("normal");
        let (scenario, times) = match word.rsplit_once('x') {
            Some((s, n)) if n.parse::<usize>().is_ok() => (s, Some(n.parse::<usize>().unwrap())),
            _ => (word, None),
        };
        let seen = {
            let mut map = self.seen.lock().unwrap();
            let n = map.entry(last.clone()).or_default();
            *n += 1;
            *n
        };
        let misbehave = times.is_none_or(|n| seen <= n);
        let scenario = if misbehave { scenario } else { "normal" };

        match scenario {
            "r429" => {
                let body = r#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
                respond(
                    &mut socket,
                    "429 Too Many Requests",
                    &[("Retry-After", "1")],
                    body,
                )
                .await
            }
            "e500" => {
                let body = r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#;
                respond(&mut socket, "500 Internal Server Error", &[], body).await
            }
            "bad400" if ollama => {
                respond(
                    &mut socket,
                    "400 Bad Request",
                    &[],
                    r#"{"error":"invalid options: num_predict must be positive"}"#,
                )
                .await
            }
            "bad400" => {
                let body = r#"{"error":{"message":"'messages' must contain at least one message with content","type":"invalid_request_error","param":"messages","code":null}}"#;
                respond(&mut socket, "400 Bad Request", &[], body).await
            }
            "malformed" => {
                respond(
                    &mut socket,
                    "200 OK",
                    &[],
                    r#"{"id":"chatcmpl-1","choices":[{"index":0,"#,
                )
                .await
            }
            "slowfirst" => {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                self.answer(&mut socket, ollama, generate, stream, &model, None)
                    .await
            }
            "stall" if stream => {
                self.answer(
                    &mut socket,
                    ollama,
                    generate,
                    stream,
                    &model,
                    Some(Misstep::Stall),
                )
                .await
            }
            "drop" if stream => {
                self.answer(
                    &mut socket,
                    ollama,
                    generate,
                    stream,
                    &model,
                    Some(Misstep::Drop),
                )
                .await
            }
            _ => {
                self.answer(&mut socket, ollama, generate, stream, &model, None)
                    .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        socket: &mut TcpStream,
        ollama: bool,
        generate: bool,
        stream: bool,
        model: &str,
        misstep: Option<Misstep>,
    ) -> std::io::Result<()> {
        let completion = ANSWER.len() as u64;
        match (ollama, stream) {
            (false, false) => {
                let body = json!({
                    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion",
                    "created": 1741569952, "model": model, "system_fingerprint": "fp_44709d6fcb",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER.concat(), "refusal": null},
                                 "logprobs": null, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
                              "total_tokens": PROMPT_TOKENS + completion}
                });
                respond(socket, "200 OK", &[], &body.to_string()).await
            }
            (true, false) if generate => {
                let body = json!({
                    "model": model, "created_at": "2023-08-04T19:22:45.499127Z",
                    "response": ANSWER.concat(), "done": true, "done_reason": "stop",
                    "context": [1, 2, 3], "total_duration": 10706818083u64, "load_duration": 6338219291u64,
                    "prompt_eval_count": PROMPT_TOKENS, "prompt_eval_duration": 130079000,
                    "eval_count": completion, "eval_duration": 4232710000u64
                });
                respond(socket, "200 OK", &[], &body.to_string()).await
            }
            (true, false) => {
                let body = json!({
                    "model": model, "created_at": "2023-12-12T14:13:43.416799Z",
                    "message": {"role": "assistant", "content": ANSWER.concat()},
                    "done": true, "done_reason": "stop", "total_duration": 5191566416u64,
                    "load_duration": 2154458, "prompt_eval_count": PROMPT_TOKENS,
                    "prompt_eval_duration": 383809000, "eval_count": completion, "eval_duration": 4799921000u64
                });
                respond(socket, "200 OK", &[], &body.to_string()).await
            }
            (false, true) => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                socket.write_all(head.as_bytes()).await?;
                let chunk = |delta: Value, finish: Value| {
                    json!({"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
                           "model": model, "system_fingerprint": "fp_44709d6fcb",
                           "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
                };
                write_chunk(
                    socket,
                    &format!(
                        "data: {}\n\n",
                        chunk(json!({"role": "assistant", "content": ""}), Value::Null)
                    ),
                )
                .await?;
                for (i, piece) in ANSWER.iter().enumerate() {
                    if i == 2 && misstep_now(socket, misstep).await? {
                        return Ok(());
                    }
                    write_chunk(
                        socket,
                        &format!(
                            "data: {}\n\n",
                            chunk(json!({"content": piece}), Value::Null)
                        ),
                    )
                    .await?;
                }
                write_chunk(
                    socket,
                    &format!("data: {}\n\n", chunk(json!({}), json!("stop"))),
                )
                .await?;
                let usage = json!({"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
                    "model": model, "system_fingerprint": "fp_44709d6fcb", "choices": [],
                    "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
                              "total_tokens": PROMPT_TOKENS + completion}});
                write_chunk(socket, &format!("data: {usage}\n\n")).await?;
                write_chunk(socket, "data: [DONE]\n\n").await?;
                socket.write_all(b"0\r\n\r\n").await
            }
            (true, true) => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                socket.write_all(head.as_bytes()).await?;
                for (i, piece) in ANSWER.iter().enumerate() {
                    if i == 2 && misstep_now(socket, misstep).await? {
                        return Ok(());
                    }
                    let line = if generate {
                        json!({"model": model, "created_at": "2023-08-04T08:52:19.385406455-07:00",
                               "response": piece, "done": false})
                    } else {
                        json!({"model": model, "created_at": "2023-08-04T08:52:19.385406455-07:00",
                               "message": {"role": "assistant", "content": piece}, "done": false})
                    };
                    write_chunk(socket, &format!("{line}\n")).await?;
                }
                let last = json!({"model": model, "created_at": "2023-08-04T19:22:45.499127Z",
                    "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop",
                    "total_duration": 4883583458u64, "load_duration": 1334875, "prompt_eval_count": PROMPT_TOKENS,
                    "prompt_eval_duration": 342546000, "eval_count": completion, "eval_duration": 4535599000u64});
                write_chunk(socket, &format!("{last}\n")).await?;
                socket.write_all(b"0\r\n\r\n").await
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Misstep {
    /// Stop sending (the stream stalls) for longer than any test's idle timeout.
    Stall,
    /// Close the connection mid-stream.
    Drop,
}

/// Carries out a misstep; true if the response is over.
async fn misstep_now(socket: &mut TcpStream, misstep: Option<Misstep>) -> std::io::Result<bool> {
    match misstep {
        None => Ok(false),
        Some(Misstep::Stall) => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(true)
        }
        Some(Misstep::Drop) => {
            socket.shutdown().await?;
            Ok(true)
        }
    }
}

async fn write_chunk(socket: &mut TcpStream, data: &str) -> std::io::Result<()> {
    socket
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await?;
    socket.flush().await
}

async fn respond(
    socket: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.flush().await
}

/// Reads one request: its path, `Authorization` header and body (by
/// Content-Length).
async fn read_request(
    socket: &mut TcpStream,
) -> std::io::Result<(String, Option<String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let auth = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("authorization")
            .then(|| v.trim().to_owned())
    });
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = socket.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Ok((path, auth, buf[head_end..].to_vec()))
}
