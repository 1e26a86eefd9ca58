//! Where a forward pass spends its wall time, op by op (`mamba-rs bench
//! --profile`): a [`MambaOps`] that times each call of the backend it wraps
//! and adds it to a [`Profile`] under the op's name (the products by the
//! weight they read: `in_proj`, `x_proj`, `out_proj`, `lm_head`).
//!
//! On the CPU every op has finished when it returns, so its wall time is
//! its cost, the threads' fork and join included.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use mamba_core::ops::ScanBufs;
use mamba_core::{Layer, MambaOps, Model, Ragged, Tensor};

use crate::bench::data_bytes;

/// The calls of one op.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpTime {
    pub name: &'static str,
    pub calls: u64,
    pub time: Duration,
    /// Weight bytes the calls read (products and the embedding rows).
    pub weight_bytes: u64,
}

/// Time per op over the passes run through [`Timed`], in the order the ops
/// first ran.
#[derive(Debug, Default)]
pub struct Profile {
    ops: Mutex<Vec<OpTime>>,
}

impl Profile {
    pub fn new() -> Self {
        Self::default()
    }

    /// What has been timed so far.
    pub fn ops(&self) -> Vec<OpTime> {
        self.ops.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Forget what has been timed.
    pub fn clear(&self) {
        if let Ok(mut v) = self.ops.lock() {
            v.clear();
        }
    }

    fn add(&self, name: &'static str, time: Duration, weight_bytes: u64) {
        let Ok(mut v) = self.ops.lock() else { return };
        let i = match v.iter().position(|o| o.name == name) {
            Some(i) => i,
            None => {
                v.push(OpTime { name, ..OpTime::default() });
                v.len() - 1
            }
        };
        let o = &mut v[i];
        o.calls += 1;
        o.time += time;
        o.weight_bytes += weight_bytes;
    }
}

/// The ops of `inner`, each call timed into a [`Profile`].
pub struct Timed<'p, 'w, O> {
    inner: O,
    profile: &'p Profile,
    /// Where each product's weights start, and the product's name.
    products: Vec<(usize, &'static str)>,
    _w: std::marker::PhantomData<Tensor<'w>>,
}

impl<'p, 'w, O> Timed<'p, 'w, O> {
    /// Time the ops of `inner` running `model`.
    pub fn new(inner: O, model: &Model<'w, Tensor<'w>>, profile: &'p Profile) -> Self {
        let at = |t: &Tensor<'_>| weight_address(t);
        let mut products: Vec<(usize, &'static str)> = model
            .layers
            .iter()
            .flat_map(|l| {
                [(at(&l.in_proj), "in_proj"), (at(&l.x_proj), "x_proj"), (at(&l.out_proj), "out_proj")]
            })
            .collect();
        products.push((at(model.head()), "lm_head"));
        Timed { inner, profile, products, _w: std::marker::PhantomData }
    }

    fn time<R>(&self, name: &'static str, weight_bytes: u64, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        self.profile.add(name, t0.elapsed(), weight_bytes);
        r
    }

    fn product_name(&self, w: &Tensor<'_>) -> &'static str {
        let a = weight_address(w);
        self.products.iter().find(|p| p.0 == a).map_or("linear", |p| p.1)
    }
}

fn weight_address(t: &Tensor<'_>) -> usize {
    data_bytes(t.data).next().map_or(0, |b| b.as_ptr() as usize)
}

fn bytes_of(t: &Tensor<'_>) -> u64 {
    data_bytes(t.data).map(|b| b.len() as u64).sum()
}

impl<'w, O: MambaOps<Weight = Tensor<'w>>> MambaOps for Timed<'_, 'w, O> {
    type Buf = O::Buf;
    type Weight = Tensor<'w>;
    type Error = O::Error;

    fn embed(&self, table: &Tensor<'w>, tokens: &[u32], out: &mut O::Buf) -> Result<(), O::Error> {
        let row = bytes_of(table) / table.rows.max(1) as u64;
        self.time("embed", row * tokens.len() as u64, || self.inner.embed(table, tokens, out))
    }

    fn rms_norm(
        &self,
        x: &O::Buf,
        rows: usize,
        w: &Tensor<'w>,
        eps: f32,
        out: &mut O::Buf,
    ) -> Result<(), O::Error> {
        self.time("rms_norm", bytes_of(w), || self.inner.rms_norm(x, rows, w, eps, out))
    }

    fn add_assign(&self, acc: &mut O::Buf, x: &O::Buf, len: usize) -> Result<(), O::Error> {
        self.time("residual", 0, || self.inner.add_assign(acc, x, len))
    }

    fn linear(
        &self,
        x: &O::Buf,
        rows: usize,
        w: &Tensor<'w>,
        bias: Option<&Tensor<'w>>,
        out: &mut O::Buf,
    ) -> Result<(), O::Error> {
        let bytes = bytes_of(w) + bias.map_or(0, bytes_of);
        self.time(self.product_name(w), bytes, || self.inner.linear(x, rows, w, bias, out))
    }

    fn in_proj(
        &self,
        layer: Layer<'_, Tensor<'w>>,
        x: &O::Buf,
        rows: usize,
        xz: &mut O::Buf,
    ) -> Result<(), O::Error> {
        let bytes = bytes_of(&layer.w.in_proj) + layer.w.in_proj_bias.as_ref().map_or(0, bytes_of);
        self.time("in_proj", bytes, || self.inner.in_proj(layer, x, rows, xz))
    }

    fn dt_proj_softplus(
        &self,
        layer: Layer<'_, Tensor<'w>>,
        dbc: &O::Buf,
        rows: usize,
        dt: &mut O::Buf,
    ) -> Result<(), O::Error> {
        self.time("dt_proj", dt_bytes(layer), || self.inner.dt_proj_softplus(layer, dbc, rows, dt))
    }

    fn conv1d_prefill(
        &self,
        layer: Layer<'_, Tensor<'w>>,
        batch: Ragged<'_>,
        xz: &O::Buf,
        states: &mut O::Buf,
        out: &mut O::Buf,
    ) -> Result<(), O::Error> {
        self.time("conv1d", conv_bytes(layer), || self.inner.conv1d_prefill(layer, batch, xz, states, out))
    }

    fn conv1d_step(
        &self,
        layer: Layer<'_, Tensor<'w>>,
        slots: &[usize],
        xz: &O::Buf,
        states: &mut O::Buf,
        out: &mut O::Buf,
    ) -> Result<(), O::Error> {
        self.time("conv1d", conv_bytes(layer), || self.inner.conv1d_step(layer, slots, xz, states, out))
    }

    fn scan_prefill(
        &self,
        layer: Layer<'_, Tensor<'w>>,
        batch: Ragged<'_>,
        act: ScanBufs<'_, O::Buf>,
        states: &mut O::Buf,
        y: &mut O::Buf,
    ) -> Result<(), O::Error> {
        self.time("scan", scan_bytes(layer), || self.inner.scan_prefill(layer, batch, act, states, y))
    }

    fn scan_step(
        &self,
        layer: Layer<'_, Tensor<'w>>,
        slots: &[usize],
        act: ScanBufs<'_, O::Buf>,
        states: &mut O::Buf,
        y: &mut O::Buf,
    ) -> Result<(), O::Error> {
        self.time("scan", scan_bytes(layer), || self.inner.scan_step(layer, slots, act, states, y))
    }

    fn dt_scan_step(
        &self,
        layer: Layer<'_, Tensor<'w>>,
        slots: &[usize],
        x: &O::Buf,
        dbc: &O::Buf,
        xz: &O::Buf,
        dt: &mut O::Buf,
        states: &mut O::Buf,
        y: &mut O::Buf,
    ) -> Result<(), O::Error> {
        // Timed as one: the backend may run the two over each thread's channels at once.
        let bytes = dt_bytes(layer) + scan_bytes(layer);
        self.time("dt_proj+scan", bytes, || self.inner.dt_scan_step(layer, slots, x, dbc, xz, dt, states, y))
    }

    fn gather_rows(
        &self,
        x: &O::Buf,
        width: usize,
        rows: &[usize],
        out: &mut O::Buf,
    ) -> Result<(), O::Error> {
        self.time("gather", 0, || self.inner.gather_rows(x, width, rows, out))
    }
}

fn conv_bytes(layer: Layer<'_, Tensor<'_>>) -> u64 {
    bytes_of(&layer.w.conv_w) + layer.w.conv_b.as_ref().map_or(0, bytes_of)
}

fn dt_bytes(layer: Layer<'_, Tensor<'_>>) -> u64 {
    bytes_of(&layer.w.dt_proj) + bytes_of(&layer.w.dt_bias)
}

fn scan_bytes(layer: Layer<'_, Tensor<'_>>) -> u64 {
    bytes_of(&layer.w.a) + bytes_of(&layer.w.d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{LogitsMode, Session};
    use crate::synthetic::{synthetic_model, Shape};
    use mamba_core::{DType, Sequential};
    use std::sync::Arc;

    #[test]
    fn timing_the_ops_changes_no_result() {
        let shape = Shape { name: "tiny", d_model: 32, n_layer: 2, vocab_size: 100 };
        let m = synthetic_model(&shape, DType::BF16, 5).unwrap();
        let seqs: [&[u32]; 2] = [&[3, 1, 4, 1, 5], &[9, 2, 6]];
        let run = |profile: Option<Arc<Profile>>| {
            let mut s = Session::new(&m, &Sequential, 2).unwrap();
            s.set_profile(profile);
            let mut out = s.prefill(&seqs, &[0, 1], LogitsMode::All).unwrap().concat();
            out.extend_from_slice(s.step(&[7, 8], &[0, 1]).unwrap());
            out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        let p = Arc::new(Profile::new());
        assert_eq!(run(Some(p.clone())), run(None));
        let ops = p.ops();
        let calls = |name: &str| ops.iter().find(|o| o.name == name).map(|o| o.calls);
        // The prefill's two layers, then the step's.
        assert_eq!((calls("scan"), calls("dt_proj"), calls("dt_proj+scan")), (Some(2), Some(2), Some(2)));
        assert!(ops.iter().all(|o| o.name != "linear"), "every product is named: {ops:?}");
        p.clear();
        assert!(p.ops().is_empty());
    }
}
