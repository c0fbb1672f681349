//! Random workloads against a reference model of the current and the durable state, with
//! crashes at random points, comparing the whole tree after each crash.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use common::*;
use crashfs::Model;

const DIRS: [&str; 3] = ["", "d1", "d2"];
const NAMES: [&str; 3] = ["a", "b", "c"];

type Loc = (usize, &'static str);

/// One file as the rules say it should be: where it is and where it durably is, what it holds
/// and what it held at its last fsync.
struct File {
    cur: Option<Loc>,
    dur: Option<Loc>,
    data: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Default)]
struct Reference {
    files: BTreeMap<usize, File>,
    next: usize,
}

fn path((dir, name): Loc) -> String {
    if DIRS[dir].is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", DIRS[dir])
    }
}

impl Reference {
    fn at(&self, loc: Loc) -> Option<usize> {
        self.files.iter().find(|(_, f)| f.cur == Some(loc)).map(|(&id, _)| id)
    }

    fn unlink(&mut self, id: usize) {
        let file = self.files.get_mut(&id).unwrap();
        file.cur = None;
        if file.dur.is_none() {
            self.files.remove(&id);
        }
    }

    /// The current location becomes the durable one; a file whose durable name this takes
    /// follows to its own current location (rename is atomic).
    fn commit(&mut self, id: usize) {
        let Some(file) = self.files.get_mut(&id) else { return };
        if file.cur == file.dur {
            return;
        }
        file.dur = file.cur;
        let Some(loc) = file.dur else {
            self.files.remove(&id);
            return;
        };
        let displaced: Vec<usize> =
            self.files.iter().filter(|(&o, f)| o != id && f.dur == Some(loc)).map(|(&o, _)| o).collect();
        for other in displaced {
            self.commit(other);
        }
    }

    fn fsync_dir(&mut self, dir: usize) {
        let touched: Vec<usize> = self
            .files
            .iter()
            .filter(|(_, f)| f.cur != f.dur && [f.cur, f.dur].iter().flatten().any(|loc| loc.0 == dir))
            .map(|(&id, _)| id)
            .collect();
        for id in touched {
            self.commit(id);
        }
    }

    fn crash(&mut self, model: Model) {
        let names_lost = model == Model::DataAndMetadata;
        self.files.retain(|_, f| if names_lost { f.dur.is_some() } else { f.cur.is_some() });
        for file in self.files.values_mut() {
            if names_lost {
                file.cur = file.dur;
            } else {
                file.dur = file.cur;
            }
            file.data = file.synced.clone();
        }
    }

    fn tree(&self) -> BTreeMap<String, Option<Vec<u8>>> {
        let mut tree: BTreeMap<_, _> = DIRS[1..].iter().map(|d| (d.to_string(), None)).collect();
        for file in self.files.values() {
            if let Some(loc) = file.cur {
                tree.insert(path(loc), Some(file.data.clone()));
            }
        }
        tree
    }
}

fn run(seed: u64, ops: usize) {
    let Some(fx) = Fixture::new(Model::DataAndMetadata) else { return };
    for dir in &DIRS[1..] {
        fs::create_dir(fx.path(dir)).unwrap();
    }
    fsync_dir(&fx.path(""));
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut reference = Reference::default();
    let mut log = Vec::new();
    let mut crashes = 0;
    for step in 0..ops {
        let loc: Loc = (rng.below(3) as usize, NAMES[rng.below(3) as usize]);
        let file = reference.at(loc);
        let p = fx.path(&path(loc));
        let roll = rng.below(100);
        let op = match (roll, file) {
            (0..30, Some(id)) => {
                let (offset, len) = (rng.below(20_000), 1 + rng.below(9000) as usize);
                let data = pattern(rng.next(), len);
                OpenOptions::new().write(true).open(&p).unwrap().write_all_at(&data, offset).unwrap();
                let content = &mut reference.files.get_mut(&id).unwrap().data;
                let end = offset as usize + len;
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[offset as usize..end].copy_from_slice(&data);
                format!("write {} {offset}+{len}", path(loc))
            }
            (30..38, Some(id)) => {
                let len = rng.below(25_000);
                OpenOptions::new().write(true).open(&p).unwrap().set_len(len).unwrap();
                reference.files.get_mut(&id).unwrap().data.resize(len as usize, 0);
                format!("truncate {} {len}", path(loc))
            }
            (38..53, Some(id)) => {
                if rng.below(2) == 0 {
                    fsync(&p);
                } else {
                    fdatasync(&p);
                }
                let file = reference.files.get_mut(&id).unwrap();
                file.synced = file.data.clone();
                format!("fsync {}", path(loc))
            }
            (53..60, Some(id)) => {
                fs::remove_file(&p).unwrap();
                reference.unlink(id);
                format!("unlink {}", path(loc))
            }
            (60..72, Some(id)) => {
                let to: Loc = (rng.below(3) as usize, NAMES[rng.below(3) as usize]);
                if to == loc {
                    continue;
                }
                fs::rename(&p, fx.path(&path(to))).unwrap();
                if let Some(replaced) = reference.at(to) {
                    reference.unlink(replaced);
                }
                reference.files.get_mut(&id).unwrap().cur = Some(to);
                format!("rename {} {}", path(loc), path(to))
            }
            (0..72, None) => {
                OpenOptions::new().write(true).create_new(true).open(&p).unwrap();
                let id = reference.next;
                reference.next += 1;
                let file = File { cur: Some(loc), dur: None, data: Vec::new(), synced: Vec::new() };
                reference.files.insert(id, file);
                format!("create {}", path(loc))
            }
            (72..85, _) => {
                fsync_dir(&fx.path(DIRS[loc.0]));
                reference.fsync_dir(loc.0);
                format!("fsyncdir /{}", DIRS[loc.0])
            }
            (85..95, _) => {
                let actual = tree(&fx.path(""));
                assert!(actual == reference.tree(), "seed {seed} step {step}: tree differs before any crash\n{log:#?}");
                continue;
            }
            _ => {
                let model = if rng.below(2) == 0 { Model::Data } else { Model::DataAndMetadata };
                let report = fx.mount.crash_with(model).unwrap();
                reference.crash(model);
                crashes += 1;
                log.push(format!("crash {model}: {report}"));
                let (actual, expected) = (tree(&fx.path("")), reference.tree());
                assert!(
                    actual == expected,
                    "seed {seed} step {step}: after the crash\nactual:   {:?}\nexpected: {:?}\n{log:#?}",
                    summary(&actual),
                    summary(&expected)
                );
                let mut backing = tree(&fx.backing(""));
                backing.retain(|path, _| !path.starts_with(".crashfs"));
                assert!(backing == expected, "seed {seed} step {step}: the backing directory differs");
                assert_eq!(fs::read_dir(fx.backing(".crashfs/trash")).unwrap().count(), 0);
                continue;
            }
        };
        log.push(op);
    }
    assert!(crashes > 0, "seed {seed} never crashed");
}

/// Paths with content lengths and a checksum, readable in a failure message.
fn summary(tree: &BTreeMap<String, Option<Vec<u8>>>) -> Vec<String> {
    let sum = |data: &Vec<u8>| data.iter().fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    tree.iter()
        .map(|(path, data)| match data {
            Some(data) => format!("{path}: {} bytes #{:08x}", data.len(), sum(data)),
            None => format!("{path}/"),
        })
        .collect()
}

#[test]
fn random_workloads_against_the_reference() {
    for seed in 1..=16 {
        run(seed, 400);
    }
}
