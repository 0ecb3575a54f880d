//! gigastt: local Russian speech-to-text with GigaAM v3 on tract.
//!
//! Data flows one way: `audio` turns bytes into 16 kHz mono samples; `speech`
//! (the only module that knows tract) turns samples into a [`speech::Transcript`];
//! `pool` runs the engine on a fixed set of worker threads; `output` renders a
//! transcript as JSON, text, SRT or VTT; `http` parses and writes HTTP/1.1 bytes;
//! `server` is the app over HTTP (routes, WebSocket sessions, guards); `cli` wires
//! them together for `gigastt serve | transcribe | download`.
#![forbid(unsafe_code)]

pub mod audio;
pub mod cli;
pub mod http;
pub mod output;
pub mod pool;
pub mod server;
pub mod speech;
