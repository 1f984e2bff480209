//! P-DATA reassembly: presentation data value fragments into whole command sets and
//! datasets.
//!
//! A dataset is held up to a size limit; past it, the rest is drained and dropped while
//! its length is still counted, so the caller can refuse it with the right status.

use bytes::BytesMut;
use dicom_ul::pdu::{PDataValue, PDataValueType};

/// Largest command set accepted; real ones are under 300 bytes.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// What the assembler produced from a fragment.
#[derive(Debug)]
pub enum Assembled {
    /// Nothing complete yet.
    Partial,
    /// A complete command set arrived on this context.
    Command {
        /// Presentation context ID.
        context_id: u8,
        /// The command set bytes.
        bytes: Vec<u8>,
    },
    /// The dataset announced by the last command is complete.
    Dataset {
        /// Presentation context ID.
        context_id: u8,
        /// The collected bytes (after the prefix given to [`PdvAssembler::expect_dataset`]),
        /// or `None` if the dataset was discarded or went over the size limit.
        buffer: Option<BytesMut>,
        /// Dataset bytes received in total.
        received: u64,
        /// Whether the dataset went over the size limit.
        over_limit: bool,
    },
}

/// A violation of the DIMSE message structure; the association must be aborted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    /// A dataset fragment when a command was expected, or the reverse.
    #[error("a {0} fragment arrived when it was not expected")]
    Unexpected(&'static str),
    /// Fragments of one message on different presentation contexts.
    #[error("message fragments switched from presentation context {0} to {1}")]
    ContextSwitch(u8, u8),
    /// A command set larger than any real one.
    #[error("command set exceeds {MAX_COMMAND_BYTES} bytes")]
    CommandTooLarge,
}

#[derive(Debug)]
enum State {
    Command {
        context_id: Option<u8>,
        bytes: Vec<u8>,
    },
    Dataset {
        context_id: u8,
        buffer: Option<BytesMut>,
        received: u64,
        over_limit: bool,
    },
}

/// Reassembles P-DATA value fragments into command sets and datasets.
///
/// After a command that announces a dataset, the caller says where the dataset goes with
/// [`expect_dataset`](Self::expect_dataset): into a buffer (possibly pre-filled with the
/// file header) or nowhere (drained and dropped, when the answer is already known).
#[derive(Debug)]
pub struct PdvAssembler {
    max_dataset: u64,
    state: State,
}

impl PdvAssembler {
    /// An assembler holding at most `max_dataset` bytes of any one dataset.
    pub fn new(max_dataset: u64) -> Self {
        PdvAssembler {
            max_dataset,
            state: State::Command {
                context_id: None,
                bytes: Vec::new(),
            },
        }
    }

    /// Whether no message is in progress (a good moment to stop).
    pub fn is_idle(&self) -> bool {
        matches!(
            &self.state,
            State::Command {
                context_id: None,
                ..
            }
        )
    }

    /// Bytes of the current dataset held in its buffer now.
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Dataset {
                buffer: Some(b), ..
            } => b.len(),
            _ => 0,
        }
    }

    /// What the current dataset's buffer holds now.
    pub fn peek(&self) -> &[u8] {
        match &self.state {
            State::Dataset {
                buffer: Some(b), ..
            } => b,
            _ => &[],
        }
    }

    /// Takes what the current dataset's buffer holds (for writing it out as a part),
    /// leaving the buffer empty and the dataset still being collected.
    pub fn take_buffered(&mut self) -> Option<BytesMut> {
        match &mut self.state {
            State::Dataset {
                buffer: Some(b), ..
            } => Some(b.split()),
            _ => None,
        }
    }

    /// Drops the rest of the current dataset as it arrives (its answer is known).
    pub fn discard(&mut self) {
        if let State::Dataset { buffer, .. } = &mut self.state {
            *buffer = None;
        }
    }

    /// Collect the next dataset on `context_id` into `buffer` (appending), or drop it.
    pub fn expect_dataset(&mut self, context_id: u8, buffer: Option<BytesMut>) {
        self.state = State::Dataset {
            context_id,
            buffer,
            received: 0,
            over_limit: false,
        };
    }

    /// Take one fragment.
    pub fn push(&mut self, pdv: PDataValue) -> Result<Assembled, AssemblyError> {
        let max_dataset = self.max_dataset;
        match (&mut self.state, pdv.value_type) {
            (State::Command { context_id, bytes }, PDataValueType::Command) => {
                if let Some(ctx) = *context_id
                    && ctx != pdv.presentation_context_id
                {
                    return Err(AssemblyError::ContextSwitch(
                        ctx,
                        pdv.presentation_context_id,
                    ));
                }
                if bytes.len() + pdv.data.len() > MAX_COMMAND_BYTES {
                    return Err(AssemblyError::CommandTooLarge);
                }
                *context_id = Some(pdv.presentation_context_id);
                if bytes.is_empty() {
                    *bytes = pdv.data;
                } else {
                    bytes.extend_from_slice(&pdv.data);
                }
                if !pdv.is_last {
                    return Ok(Assembled::Partial);
                }
                let bytes = std::mem::take(bytes);
                self.state = State::Command {
                    context_id: None,
                    bytes: Vec::new(),
                };
                Ok(Assembled::Command {
                    context_id: pdv.presentation_context_id,
                    bytes,
                })
            }
            (
                State::Dataset {
                    context_id,
                    buffer,
                    received,
                    over_limit,
                },
                PDataValueType::Data,
            ) => {
                if *context_id != pdv.presentation_context_id {
                    return Err(AssemblyError::ContextSwitch(
                        *context_id,
                        pdv.presentation_context_id,
                    ));
                }
                *received += pdv.data.len() as u64;
                if *received > max_dataset {
                    // Drain and drop: keep counting, hold nothing more.
                    *over_limit = true;
                    *buffer = None;
                } else if let Some(buf) = buffer {
                    buf.extend_from_slice(&pdv.data);
                }
                if !pdv.is_last {
                    return Ok(Assembled::Partial);
                }
                let done = Assembled::Dataset {
                    context_id: *context_id,
                    buffer: buffer.take(),
                    received: *received,
                    over_limit: *over_limit,
                };
                self.state = State::Command {
                    context_id: None,
                    bytes: Vec::new(),
                };
                Ok(done)
            }
            (State::Command { .. }, PDataValueType::Data) => {
                Err(AssemblyError::Unexpected("dataset"))
            }
            (State::Dataset { .. }, PDataValueType::Command) => {
                Err(AssemblyError::Unexpected("command"))
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn pdv(ctx: u8, command: bool, last: bool, data: &[u8]) -> PDataValue {
        PDataValue {
            presentation_context_id: ctx,
            value_type: if command {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: last,
            data: data.to_vec(),
        }
    }

    #[test]
    fn assembler_joins_fragments() {
        let mut a = PdvAssembler::new(1000);
        assert!(a.is_idle());
        assert!(matches!(
            a.push(pdv(1, true, false, b"ab")).unwrap(),
            Assembled::Partial
        ));
        assert!(!a.is_idle());
        match a.push(pdv(1, true, true, b"cd")).unwrap() {
            Assembled::Command { context_id, bytes } => {
                assert_eq!(context_id, 1);
                assert_eq!(bytes, b"abcd");
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut prefix = BytesMut::new();
        prefix.extend_from_slice(b"HDR");
        a.expect_dataset(1, Some(prefix));
        a.push(pdv(1, false, false, b"xy")).unwrap();
        match a.push(pdv(1, false, true, b"z")).unwrap() {
            Assembled::Dataset {
                buffer,
                received,
                over_limit,
                ..
            } => {
                assert_eq!(&buffer.unwrap()[..], b"HDRxyz");
                assert_eq!(received, 3);
                assert!(!over_limit);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(a.is_idle());
    }

    #[test]
    fn assembler_drains_oversized_datasets() {
        let mut a = PdvAssembler::new(10);
        a.expect_dataset(3, Some(BytesMut::new()));
        a.push(pdv(3, false, false, &[0; 8])).unwrap();
        a.push(pdv(3, false, false, &[0; 8])).unwrap();
        match a.push(pdv(3, false, true, &[0; 8])).unwrap() {
            Assembled::Dataset {
                buffer,
                received,
                over_limit,
                ..
            } => {
                assert!(buffer.is_none());
                assert_eq!(received, 24);
                assert!(over_limit);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn assembler_refuses_protocol_violations() {
        let mut a = PdvAssembler::new(10);
        assert_eq!(
            a.push(pdv(1, false, true, b"x")).unwrap_err(),
            AssemblyError::Unexpected("dataset")
        );
        let mut a = PdvAssembler::new(10);
        a.push(pdv(1, true, false, b"x")).unwrap();
        assert_eq!(
            a.push(pdv(3, true, true, b"x")).unwrap_err(),
            AssemblyError::ContextSwitch(1, 3)
        );
        let mut a = PdvAssembler::new(10);
        a.expect_dataset(1, None);
        assert_eq!(
            a.push(pdv(1, true, true, b"x")).unwrap_err(),
            AssemblyError::Unexpected("command")
        );
        let mut a = PdvAssembler::new(10);
        assert_eq!(
            a.push(pdv(1, true, false, &vec![0; MAX_COMMAND_BYTES + 1]))
                .unwrap_err(),
            AssemblyError::CommandTooLarge
        );
    }
}
