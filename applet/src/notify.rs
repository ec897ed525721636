//! Desktop notifications (notify-rust over the session bus): one at a time. Each new one
//! replaces the one before (the server's id is reused), so the person sees the latest
//! event, never a stack.
//!
//! Buttons: the server sends `ActionInvoked` to the connection that sent the notification
//! (dunst does so), so the handle of the last one is kept and a task waits on it; a newer
//! notification aborts the older wait.

use handoff::escape::{markup, plain};
use notify_rust::{Notification, NotificationResponse, Timeout, Urgency};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use crate::Msg;
use crate::model::{Action, Note, note_key};

pub struct Notifier {
    tx: UnboundedSender<Msg>,
    id: Option<u32>,
    actions: Vec<Action>,
    waiter: Option<JoinHandle<()>>,
}

impl Notifier {
    pub fn new(tx: UnboundedSender<Msg>) -> Self {
        Self {
            tx,
            id: None,
            actions: Vec::new(),
            waiter: None,
        }
    }

    /// The current notification's action for `key`.
    pub fn action(&self, key: &str) -> Option<Action> {
        self.actions.iter().find(|a| note_key(a) == key).cloned()
    }

    pub async fn show(&mut self, note: Note, icon: &str) {
        if let Some(w) = self.waiter.take() {
            w.abort();
        }
        // The body is markup to the server (body-markup): `<`, `&` and controls in a
        // process or VM name must show as text. The summary is plain text by the spec
        // (dunst escapes it itself): only its controls are escaped.
        let mut n = Notification::new();
        n.appname("handoff")
            .summary(&plain(&note.summary))
            .body(&markup(&note.body))
            .icon(icon)
            .urgency(if note.critical {
                Urgency::Critical
            } else {
                Urgency::Normal
            })
            .timeout(if note.critical {
                Timeout::Never
            } else {
                Timeout::Default
            });
        for (a, label) in &note.actions {
            n.action(note_key(a), label);
        }
        if let Some(id) = self.id {
            n.id(id);
        }
        tracing::info!("notification: {} — {}", note.summary, note.body);
        match n.show_async().await {
            Ok(handle) => {
                self.id = Some(handle.id());
                self.actions = note.actions.into_iter().map(|(a, _)| a).collect();
                if !self.actions.is_empty() {
                    let tx = self.tx.clone();
                    self.waiter = Some(tokio::spawn(async move {
                        handle
                            .wait_for_action_async(|r: &NotificationResponse| {
                                if let NotificationResponse::Action(key) = r {
                                    let _ = tx.send(Msg::NoteAction(key.clone()));
                                }
                            })
                            .await;
                    }));
                }
            }
            Err(e) => tracing::warn!("cannot show a notification ({}): {e}", note.summary),
        }
    }
}
