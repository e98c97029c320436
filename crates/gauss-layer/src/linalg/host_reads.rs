//! A log of the library's reads of tensor data back to the host, so tests can prove what a
//! training step costs a GPU in synchronizations (each read waits for the device) and that
//! every read happens in the working dtype (no f64 on a device that has none).
//!
//! Every read on the training path goes through [`record`]: [`super::read_scalar`] and the
//! host moves of [`super::host`]. Reads off that path are not logged (the raw-value check
//! when a `Precision` is built, saves, import, the k-means labels of a mixture's start, error
//! messages; the k-means scalars go through `read_scalar` and are). Recording is per thread
//! and off unless a [`HostReadLog`] is alive on that thread, so it costs a thread-local lookup
//! per read.

use std::cell::RefCell;

use candle_core::{DType, Tensor};

/// One read of device data to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRead {
    /// What read it (a function name).
    pub what: &'static str,
    /// The dtype the data had on its device when it was read.
    pub dtype: DType,
    /// Number of elements moved.
    pub elements: usize,
    /// Whether the tensor lived on the CPU (a free read) rather than a GPU (a sync).
    pub on_cpu: bool,
}

thread_local! {
    static LOG: RefCell<Option<Vec<HostRead>>> = const { RefCell::new(None) };
}

/// Notes a read of `tensor` to the host, when a [`HostReadLog`] is recording on this thread.
pub(crate) fn record(what: &'static str, tensor: &Tensor) {
    LOG.with(|log| {
        if let Some(reads) = log.borrow_mut().as_mut() {
            reads.push(HostRead {
                what,
                dtype: tensor.dtype(),
                elements: tensor.elem_count(),
                on_cpu: tensor.device().is_cpu(),
            });
        }
    });
}

/// Records the library's host reads on the current thread while it lives.
///
/// ```
/// use gauss_layer::HostReadLog;
/// let log = HostReadLog::start();
/// // ... a training step ...
/// assert!(log.reads().is_empty());
/// ```
#[derive(Debug)]
pub struct HostReadLog {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl HostReadLog {
    /// Starts recording (clearing anything recorded before on this thread).
    pub fn start() -> Self {
        LOG.with(|log| *log.borrow_mut() = Some(Vec::new()));
        Self {
            _not_send: std::marker::PhantomData,
        }
    }

    /// The reads recorded so far, in order.
    pub fn reads(&self) -> Vec<HostRead> {
        LOG.with(|log| log.borrow().clone().unwrap_or_default())
    }

    /// Forgets what was recorded so far and keeps recording.
    pub fn clear(&self) {
        LOG.with(|log| {
            if let Some(reads) = log.borrow_mut().as_mut() {
                reads.clear();
            }
        });
    }
}

impl Drop for HostReadLog {
    fn drop(&mut self) {
        LOG.with(|log| *log.borrow_mut() = None);
    }
}
