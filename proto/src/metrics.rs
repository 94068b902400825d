//! Counters and gauges owned by one node, rendered in the Prometheus text
//! format. Each node (exchange or app server) holds its own set, so several
//! nodes in one test process never share counters. Labels come from small
//! fixed sets given at construction (frame kinds, error kinds), never from
//! ids.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// A counter family over one label with a fixed set of values. A value
/// outside the set is counted under `other`.
#[derive(Debug)]
pub struct Family {
    label: &'static str,
    values: &'static [&'static str],
    counts: Box<[AtomicU64]>,
}

impl Family {
    pub fn new(label: &'static str, values: &'static [&'static str]) -> Family {
        Family {
            label,
            values,
            counts: (0..=values.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn index(&self, value: &str) -> usize {
        self.values
            .iter()
            .position(|v| *v == value)
            .unwrap_or(self.values.len())
    }

    pub fn inc(&self, value: &str) {
        self.add(value, 1);
    }

    pub fn add(&self, value: &str, n: u64) {
        self.counts[self.index(value)].fetch_add(n, Relaxed);
    }

    /// Add `counts[i]` to the i-th value of the family (for a batch counted
    /// locally first).
    pub fn add_each(&self, counts: &[u64]) {
        for (c, &n) in self.counts.iter().zip(counts) {
            if n > 0 {
                c.fetch_add(n, Relaxed);
            }
        }
    }

    pub fn get(&self, value: &str) -> u64 {
        self.counts[self.index(value)].load(Relaxed)
    }
}

/// Builds one exposition page.
#[derive(Default)]
pub struct Page(String);

impl Page {
    pub fn counter(&mut self, name: &str, help: &str, c: &Counter) -> &mut Self {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            c.get()
        );
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, g: &Gauge) -> &mut Self {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
            g.get()
        );
        self
    }

    pub fn family(&mut self, name: &str, help: &str, f: &Family) -> &mut Self {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} counter");
        for (i, v) in f.values.iter().chain(std::iter::once(&"other")).enumerate() {
            let n = f.counts[i].load(Relaxed);
            let _ = writeln!(self.0, "{name}{{{}=\"{v}\"}} {n}", f.label);
        }
        self
    }

    /// One series per numeric id (`label="id"`), the ids known only at run
    /// time (peer exchanges): `kind` is `counter` or `gauge`.
    pub fn by_id(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        label: &str,
        series: &[(u32, i64)],
    ) -> &mut Self {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, v) in series {
            let _ = writeln!(self.0, "{name}{{{label}=\"{id}\"}} {v}");
        }
        self
    }

    /// A gauge of 1 labelled with a value known only at run time (an
    /// "info" metric: which node, which version). Quotes, backslashes and
    /// line breaks in the value are escaped.
    pub fn info(&mut self, name: &str, help: &str, label: &str, value: &str) -> &mut Self {
        let mut escaped = String::with_capacity(value.len());
        for ch in value.chars() {
            match ch {
                '\\' => escaped.push_str("\\\\"),
                '"' => escaped.push_str("\\\""),
                '\n' => escaped.push_str("\\n"),
                c => escaped.push(c),
            }
        }
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{label}=\"{escaped}\"}} 1"
        );
        self
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// Something that can render its metrics page.
pub trait Render: Send + Sync + 'static {
    fn render(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_renders_counters_and_families() {
        let c = Counter::default();
        c.add(3);
        let f = Family::new("reason", &["a", "b"]);
        f.inc("b");
        f.inc("zzz");
        let mut p = Page::default();
        p.counter("x_total", "x.", &c).family("y_total", "y.", &f);
        let s = p.finish();
        assert!(s.contains("x_total 3\n"));
        assert!(s.contains("y_total{reason=\"a\"} 0\n"));
        assert!(s.contains("y_total{reason=\"b\"} 1\n"));
        assert!(s.contains("y_total{reason=\"other\"} 1\n"));
        assert_eq!(f.get("zzz"), 1);
    }

    #[test]
    fn an_info_gauge_escapes_its_label_value() {
        let mut p = Page::default();
        p.info("db_node", "Node.", "node", "h\"1\\x:3306");
        assert!(
            p.finish()
                .ends_with("# TYPE db_node gauge\ndb_node{node=\"h\\\"1\\\\x:3306\"} 1\n")
        );
    }
}
