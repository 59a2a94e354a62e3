//! How a render reports progress and how it is told to stop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a render reports as it goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// One optimisation step finished. `step` counts from 1 to `total`.
    Step {
        step: u32,
        total: u32,
        /// The summed loss that was minimised.
        loss: f32,
        /// One loss per prompt (text, then image, then noise), then the z regulariser
        /// when it is on.
        losses: Vec<f32>,
        elapsed_s: f64,
        eta_s: f64,
    },
    /// A frame was written.
    Frame { step: u32, path: PathBuf },
    /// A checkpoint was written.
    Checkpoint { step: u32, path: PathBuf },
    /// A revision took effect before step `step + 1` ran.
    Steered {
        revision: u32,
        step: u32,
        changes: serde_json::Value,
    },
}

/// Receives progress events on the render thread; keep `event` quick.
pub trait ProgressSink: Send {
    fn event(&mut self, ev: ProgressEvent);
}

impl<F: FnMut(ProgressEvent) + Send> ProgressSink for F {
    fn event(&mut self, ev: ProgressEvent) {
        self(ev)
    }
}

impl ProgressSink for std::sync::mpsc::Sender<ProgressEvent> {
    fn event(&mut self, ev: ProgressEvent) {
        // A receiver that hung up no longer wants progress; the render goes on.
        let _ = self.send(ev);
    }
}

impl ProgressSink for tokio::sync::mpsc::UnboundedSender<ProgressEvent> {
    fn event(&mut self, ev: ProgressEvent) {
        let _ = self.send(ev);
    }
}

/// A sink that drops every event.
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn event(&mut self, _ev: ProgressEvent) {}
}

/// Stops a running render between steps. Clones share one flag pair.
///
/// `cancel` abandons the job (`RenderOutcome::Canceled`); `interrupt` is a graceful
/// shutdown: the render writes a checkpoint and returns
/// `RenderOutcome::Interrupted` so the job can resume elsewhere.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    canceled: Arc<AtomicBool>,
    interrupted: Arc<AtomicBool>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.canceled.store(true, Ordering::SeqCst);
    }

    pub fn is_canceled(&self) -> bool {
        self.canceled.load(Ordering::SeqCst)
    }

    pub fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
    }

    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_a_type_tag() {
        let ev = ProgressEvent::Frame {
            step: 50,
            path: PathBuf::from("frames/00050.png"),
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "frame");
        assert_eq!(json["step"], 50);
        let back: ProgressEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn sinks_and_tokens() {
        let mut seen = Vec::new();
        {
            let mut sink = |ev: ProgressEvent| seen.push(ev);
            let sink: &mut dyn ProgressSink = &mut sink;
            sink.event(ProgressEvent::Checkpoint {
                step: 1,
                path: "c".into(),
            });
        }
        assert_eq!(seen.len(), 1);

        let (tx, rx) = std::sync::mpsc::channel();
        let mut tx = tx;
        tx.event(ProgressEvent::Checkpoint {
            step: 2,
            path: "c".into(),
        });
        assert!(matches!(
            rx.recv().unwrap(),
            ProgressEvent::Checkpoint { step: 2, .. }
        ));

        let token = CancelToken::new();
        let clone = token.clone();
        assert!(!token.is_canceled() && !token.is_interrupted());
        clone.cancel();
        assert!(token.is_canceled() && !token.is_interrupted());
        clone.interrupt();
        assert!(token.is_interrupted());
    }
}
