//! A request's deadline, as the long inspections check it: between their
//! batches, so that work a client has been answered 504 for stops soon
//! instead of computing on for nobody.

use std::time::Instant;

use crate::error::{Error, Result};

/// The deadline (if any) and when the work began.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    deadline: Option<Instant>,
    began: Instant,
}

impl Clock {
    /// Starts the clock now.
    pub fn new(deadline: Option<Instant>) -> Self {
        Self {
            deadline,
            began: Instant::now(),
        }
    }

    /// [`Error::DeadlineExceeded`] (with the seconds the work ran) once the
    /// deadline has passed.
    pub fn check(&self) -> Result<()> {
        match self.deadline {
            Some(d) if Instant::now() >= d => {
                Err(Error::DeadlineExceeded(self.began.elapsed().as_secs_f64()))
            }
            _ => Ok(()),
        }
    }
}
