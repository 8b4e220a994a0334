//! The fleet map: which node owns which slot, loaded from the fleet file
//! every node shares (`config/fleet.toml`).

use std::path::{Path, PathBuf};

use backbone_protocol::Address;
use backbone_protocol::fleet::{SLOT_COUNT, slot_of};
use serde::Deserialize;
use thiserror::Error;

/// One node of the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Unique name; also the DNS name in its fleet certificate.
    pub name: String,
    /// `host:port` (UDP) of its node-to-node listener.
    pub peer: String,
    /// `host:port` (UDP) clients are redirected to.
    pub public: String,
    /// How many slots it owns.
    pub slot_count: usize,
}

/// Slots whose owner changes in this epoch: `from` hands their mailboxes to
/// `to`, which serves them only once the handover is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The previous owner.
    pub from: String,
    /// The new owner (it owns the slots in this map).
    pub to: String,
    /// The slots, as inclusive ranges.
    pub slots: Vec<(u16, u16)>,
}

impl Move {
    /// Whether `slot` is part of this move.
    pub fn contains(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(first, last)| (first..=last).contains(&slot))
    }
}

/// The validated slot-to-node map with its epoch.
#[derive(Clone, Debug)]
pub struct FleetMap {
    epoch: u64,
    nodes: Vec<Node>,
    moves: Vec<Move>,
    /// `owners[slot]` is an index into `nodes`.
    owners: Vec<u16>,
    digest: [u8; 32],
}

/// Why a fleet file was refused.
#[derive(Debug, Error)]
pub enum FleetError {
    /// The file could not be read.
    #[error("cannot read fleet file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("invalid fleet file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A semantic error: overlapping or missing slots, duplicate names, ...
    #[error("invalid fleet map: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    epoch: u64,
    #[serde(rename = "node")]
    nodes: Vec<NodeFile>,
    #[serde(rename = "move", default)]
    moves: Vec<MoveFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveFile {
    from: String,
    to: String,
    slots: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
    peer: String,
    public: String,
    slots: Vec<String>,
}

impl FleetMap {
    /// A one-node map owning every slot: a broker without a fleet file.
    pub fn single(public: String) -> Self {
        let nodes = vec![Node {
            name: "local".into(),
            peer: String::new(),
            public,
            slot_count: SLOT_COUNT as usize,
        }];
        Self::with_owners(0, nodes, vec![0; SLOT_COUNT as usize], Vec::new())
    }

    /// Reads and validates a fleet file.
    pub fn load(path: &Path) -> Result<Self, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|error| match error {
            FleetError::Parse { message, .. } => FleetError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a fleet file.
    pub fn parse(text: &str) -> Result<Self, FleetError> {
        let file: FleetFile = toml::from_str(text).map_err(|error| FleetError::Parse {
            path: PathBuf::new(),
            message: error.to_string(),
        })?;
        let invalid = |message: String| Err(FleetError::Invalid(message));
        if file.epoch == 0 {
            return invalid("epoch must be at least 1".into());
        }
        if file.nodes.is_empty() {
            return invalid("no [[node]] entries".into());
        }
        if file.nodes.len() > usize::from(u16::MAX) {
            return invalid("too many nodes".into());
        }
        const UNOWNED: u16 = u16::MAX;
        let mut owners = vec![UNOWNED; SLOT_COUNT as usize];
        let mut nodes = Vec::with_capacity(file.nodes.len());
        for (index, node) in file.nodes.iter().enumerate() {
            if node.name.is_empty()
                || !node
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return invalid(format!(
                    "node name {:?}: use letters, digits, '-' and '.' only",
                    node.name
                ));
            }
            if reserved_name(&node.name) {
                return invalid(format!(
                    "node name {:?} is reserved: every node certificate also names localhost and its loopback IP",
                    node.name
                ));
            }
            if nodes.iter().any(|n: &Node| n.name == node.name) {
                return invalid(format!("node {} is listed twice", node.name));
            }
            for (key, value) in [("peer", &node.peer), ("public", &node.public)] {
                if value
                    .rsplit_once(':')
                    .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
                {
                    return invalid(format!(
                        "node {}: {key} = {value:?} is not host:port",
                        node.name
                    ));
                }
            }
            let mut slot_count = 0;
            for range in &node.slots {
                let (first, last) = parse_range(range).ok_or_else(|| {
                    FleetError::Invalid(format!(
                        "node {}: slot range {range:?} is not N or N-M with N <= M < {SLOT_COUNT}",
                        node.name
                    ))
                })?;
                for slot in first..=last {
                    let owner = &mut owners[usize::from(slot)];
                    if *owner != UNOWNED {
                        return invalid(format!(
                            "slot {slot} is owned by both {} and {}",
                            file.nodes[usize::from(*owner)].name,
                            node.name
                        ));
                    }
                    *owner = index as u16;
                    slot_count += 1;
                }
            }
            nodes.push(Node {
                name: node.name.clone(),
                peer: node.peer.clone(),
                public: node.public.clone(),
                slot_count,
            });
        }
        if let Some(first) = owners.iter().position(|&owner| owner == UNOWNED) {
            let missing = owners.iter().filter(|&&owner| owner == UNOWNED).count();
            return invalid(format!(
                "{missing} slots have no owner (the first is {first}); every slot 0-{} needs one",
                SLOT_COUNT - 1
            ));
        }
        let mut moves: Vec<Move> = Vec::new();
        for entry in &file.moves {
            let known = |name: &str| nodes.iter().any(|node| node.name == name);
            if moves
                .iter()
                .any(|m| m.from == entry.from && m.to == entry.to)
            {
                return invalid(format!(
                    "two [[move]] entries from {} to {}: list all their slots in one",
                    entry.from, entry.to
                ));
            }
            if !known(&entry.from) || !known(&entry.to) || entry.from == entry.to {
                return invalid(format!(
                    "move from {:?} to {:?}: both must be nodes of the map, and differ",
                    entry.from, entry.to
                ));
            }
            let mut slots = Vec::new();
            for range in &entry.slots {
                let (first, last) = parse_range(range).ok_or_else(|| {
                    FleetError::Invalid(format!(
                        "move to {}: slot range {range:?} is invalid",
                        entry.to
                    ))
                })?;
                for slot in first..=last {
                    let owner = &nodes[usize::from(owners[usize::from(slot)])].name;
                    if *owner != entry.to {
                        return invalid(format!(
                            "move to {}: slot {slot} is owned by {owner} in this map",
                            entry.to
                        ));
                    }
                    if moves.iter().any(|m| m.contains(slot))
                        || slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
                    {
                        return invalid(format!("slot {slot} is in two moves"));
                    }
                }
                slots.push((first, last));
            }
            moves.push(Move {
                from: entry.from.clone(),
                to: entry.to.clone(),
                slots,
            });
        }
        Ok(Self::with_owners(file.epoch, nodes, owners, moves))
    }

    fn with_owners(epoch: u64, nodes: Vec<Node>, owners: Vec<u16>, moves: Vec<Move>) -> Self {
        // Canonical form: the epoch, then each slot's owner by name and
        // addresses, so the order of [[node]] entries does not matter.
        let mut hasher = blake3::Hasher::new_derive_key("backbone 2026 fleet map v1");
        hasher.update(&epoch.to_le_bytes());
        for &owner in &owners {
            let node = &nodes[usize::from(owner)];
            for field in [&node.name, &node.peer, &node.public] {
                hasher.update(&(field.len() as u32).to_le_bytes());
                hasher.update(field.as_bytes());
            }
        }
        // Every node's addresses, including nodes owning no slot.
        let mut names: Vec<&Node> = nodes.iter().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        for node in names {
            for field in [&node.name, &node.peer, &node.public] {
                hasher.update(&(field.len() as u32).to_le_bytes());
                hasher.update(field.as_bytes());
            }
        }
        for slot in 0..SLOT_COUNT {
            if let Some(m) = moves.iter().find(|m| m.contains(slot)) {
                hasher.update(&slot.to_le_bytes());
                hasher.update(&(m.from.len() as u32).to_le_bytes());
                hasher.update(m.from.as_bytes());
            }
        }
        Self {
            epoch,
            nodes,
            moves,
            owners,
            digest: *hasher.finalize().as_bytes(),
        }
    }

    /// The slot moves this epoch executes.
    pub fn moves(&self) -> &[Move] {
        &self.moves
    }

    /// The map's epoch (0 for a single node without a fleet file).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The digest two nodes compare before routing to each other.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Every node.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|node| node.name == name)
    }

    /// The node owning `slot`.
    pub fn owner_of_slot(&self, slot: u16) -> &Node {
        &self.nodes[usize::from(self.owners[usize::from(slot)])]
    }

    /// The node owning `address`'s mailbox.
    pub fn owner(&self, address: &Address) -> &Node {
        self.owner_of_slot(slot_of(address))
    }

    /// The slots `name` owns, as inclusive ranges.
    pub fn slot_ranges(&self, name: &str) -> Vec<(u16, u16)> {
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        for slot in 0..SLOT_COUNT {
            if self.owner_of_slot(slot).name != name {
                continue;
            }
            match ranges.last_mut() {
                Some((_, last)) if *last + 1 == slot => *last = slot,
                _ => ranges.push((slot, slot)),
            }
        }
        ranges
    }
}

/// Names a node may not take: every node certificate also carries them.
pub fn reserved_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Checks that `next` moves slots the way `previous` requires: every slot
/// whose owner changes is in a `[[move]]` from its previous owner, and every
/// move starts where `previous` had the slots. Returns one line per problem.
pub fn check_transition(previous: &FleetMap, next: &FleetMap) -> Vec<String> {
    let mut problems = Vec::new();
    if next.epoch() <= previous.epoch() {
        problems.push(format!(
            "the new epoch {} must be greater than {}",
            next.epoch(),
            previous.epoch()
        ));
    }
    for slot in 0..SLOT_COUNT {
        let before = &previous.owner_of_slot(slot).name;
        let after = &next.owner_of_slot(slot).name;
        let moving = next.moves().iter().find(|m| m.contains(slot));
        match moving {
            Some(m) if m.from != *before => problems.push(format!(
                "slot {slot}: the move names {} as its previous owner, but it was {before}",
                m.from
            )),
            None if before != after => problems.push(format!(
                "slot {slot} changes from {before} to {after} without a [[move]]: its mailboxes would be stranded"
            )),
            _ => {}
        }
    }
    // Report long runs once: the first few problems are enough to act on.
    if problems.len() > 10 {
        let more = problems.len() - 10;
        problems.truncate(10);
        problems.push(format!("... and {more} more"));
    }
    problems
}

fn parse_range(text: &str) -> Option<(u16, u16)> {
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (first.trim().parse().ok()?, last.trim().parse().ok()?),
        None => {
            let slot = text.trim().parse().ok()?;
            (slot, slot)
        }
    };
    (first <= last && last < SLOT_COUNT).then_some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = r#"
        epoch = 3
        [[node]]
        name = "a"
        peer = "a:7701"
        public = "127.0.0.1:7711"
        slots = ["0-1364"]
        [[node]]
        name = "b"
        peer = "b:7701"
        public = "127.0.0.1:7712"
        slots = ["1365-2729"]
        [[node]]
        name = "c"
        peer = "c:7701"
        public = "127.0.0.1:7713"
        slots = ["2730-4094", "4095"]
    "#;

    #[test]
    fn a_valid_map_assigns_every_slot() {
        let map = FleetMap::parse(THREE).expect("valid");
        assert_eq!(map.epoch(), 3);
        assert_eq!(map.owner_of_slot(0).name, "a");
        assert_eq!(map.owner_of_slot(1365).name, "b");
        assert_eq!(map.owner_of_slot(4095).name, "c");
        assert_eq!(map.node("c").map(|n| n.slot_count), Some(1366));
        assert_eq!(map.slot_ranges("c"), vec![(2730, 4095)]);
        let total: usize = map.nodes().iter().map(|n| n.slot_count).sum();
        assert_eq!(total, 4096);
    }

    #[test]
    fn the_digest_ignores_entry_order_but_not_ownership_or_epoch() {
        let map = FleetMap::parse(THREE).expect("valid");
        let parts: Vec<&str> = THREE.split("[[node]]").collect();
        let reordered = format!(
            "{}[[node]]{}[[node]]{}[[node]]{}",
            parts[0], parts[3], parts[1], parts[2]
        );
        let same = FleetMap::parse(&reordered).expect("valid");
        assert_eq!(map.digest(), same.digest());
        let moved = THREE
            .replace("0-1364", "0-1363")
            .replace("1365-2729", "1364-2729");
        assert_ne!(
            map.digest(),
            FleetMap::parse(&moved).expect("valid").digest()
        );
        let later = THREE.replace("epoch = 3", "epoch = 4");
        assert_ne!(
            map.digest(),
            FleetMap::parse(&later).expect("valid").digest()
        );
    }

    #[test]
    fn bad_maps_are_refused_with_the_reason() {
        let cases = [
            (
                THREE.replace("\"4095\"", "\"4094\""),
                "owned by both c and c",
            ),
            (
                THREE.replace(", \"4095\"", ""),
                "1 slots have no owner (the first is 4095)",
            ),
            (
                THREE.replace("1365-2729", "1364-2729"),
                "slot 1364 is owned by both a and b",
            ),
            (THREE.replace("\"4095\"", "\"4096\""), "slot range \"4096\""),
            (THREE.replace("\"4095\"", "\"9-3\""), "slot range \"9-3\""),
            (
                THREE.replace("epoch = 3", "epoch = 0"),
                "epoch must be at least 1",
            ),
            (
                THREE.replace("name = \"b\"", "name = \"a\""),
                "node a is listed twice",
            ),
            (
                THREE.replace("name = \"b\"", "name = \"b c\""),
                "use letters",
            ),
            (
                THREE.replace("b:7701", "b"),
                "peer = \"b\" is not host:port",
            ),
            (
                THREE.replace("epoch = 3", "epoch = 3\nextra = 1"),
                "unknown field",
            ),
        ];
        for (text, expected) in cases {
            let error = FleetMap::parse(&text).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn the_shipped_fleet_files_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let load =
            |file: &str| FleetMap::load(&root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for file in ["fleet.toml", "fleet-compose.toml"] {
            assert_eq!(load(file).nodes().len(), 3, "{file}");
        }
        // The demo's growth step is a safe transition from the demo's map.
        let grown = load("fleet-compose-grow.toml");
        assert_eq!(grown.nodes().len(), 4);
        assert_eq!(
            check_transition(&load("fleet-compose.toml"), &grown),
            Vec::<String>::new()
        );
    }

    #[test]
    fn moves_must_go_to_the_new_owner_and_count_in_the_digest() {
        let with_d = THREE.replace("\"2730-4094\", \"4095\"", "\"2730-4000\"")
            + "[[node]]\nname = \"d\"\npeer = \"d:7701\"\npublic = \"127.0.0.1:7714\"\nslots = [\"4001-4095\"]\n";
        let moved =
            format!("{with_d}[[move]]\nfrom = \"c\"\nto = \"d\"\nslots = [\"4001-4095\"]\n");
        let map = FleetMap::parse(&moved).expect("valid");
        assert_eq!(
            map.moves(),
            &[Move {
                from: "c".into(),
                to: "d".into(),
                slots: vec![(4001, 4095)]
            }]
        );
        assert!(map.moves()[0].contains(4001) && !map.moves()[0].contains(4000));
        let without = FleetMap::parse(&with_d).expect("valid");
        assert_ne!(map.digest(), without.digest());
        for (bad, expected) in [
            (
                moved.replace("to = \"d\"\nslots = [\"4001", "to = \"d\"\nslots = [\"4000"),
                "slot 4000 is owned by c",
            ),
            (
                format!("{moved}[[move]]\nfrom = \"b\"\nto = \"d\"\nslots = [\"4095\"]\n"),
                "slot 4095 is in two moves",
            ),
            (
                moved.replace(
                    "to = \"d\"\nslots = [\"4001-4095\"]",
                    "to = \"d\"\nslots = [\"4001-4050\"]\n[[move]]\nfrom = \"c\"\nto = \"d\"\nslots = [\"4051-4095\"]",
                ),
                "two [[move]] entries from c to d",
            ),
            (
                moved.replace("from = \"c\"", "from = \"zz\""),
                "both must be nodes",
            ),
            (
                moved.replace("from = \"c\"", "from = \"d\""),
                "both must be nodes",
            ),
        ] {
            let error = FleetMap::parse(&bad).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn a_transition_needs_a_move_from_the_previous_owner_for_every_changed_slot() {
        let previous = FleetMap::parse(THREE).expect("valid");
        let with_d = THREE
            .replace("epoch = 3", "epoch = 4")
            .replace("\"2730-4094\", \"4095\"", "\"2730-4000\"")
            + "[[node]]\nname = \"d\"\npeer = \"d:7701\"\npublic = \"127.0.0.1:7714\"\nslots = [\"4001-4095\"]\n";
        let good = format!("{with_d}[[move]]\nfrom = \"c\"\nto = \"d\"\nslots = [\"4001-4095\"]\n");
        let next = FleetMap::parse(&good).expect("valid");
        assert_eq!(check_transition(&previous, &next), Vec::<String>::new());

        let stranded = FleetMap::parse(&with_d).expect("valid");
        let problems = check_transition(&previous, &stranded);
        assert!(
            problems[0].contains("slot 4001 changes from c to d without a [[move]]"),
            "{problems:?}"
        );
        assert_eq!(problems.len(), 11, "ten lines and a summary: {problems:?}");

        let wrong_from =
            FleetMap::parse(&good.replace("from = \"c\"", "from = \"a\"")).expect("valid");
        let problems = check_transition(&previous, &wrong_from);
        assert!(
            problems[0].contains("names a as its previous owner, but it was c"),
            "{problems:?}"
        );

        let same_epoch = check_transition(&previous, &previous);
        assert!(same_epoch[0].contains("must be greater"), "{same_epoch:?}");
    }

    #[test]
    fn single_owns_everything() {
        let map = FleetMap::single("127.0.0.1:7700".into());
        assert_eq!(map.slot_ranges("local"), vec![(0, 4095)]);
        assert_eq!(map.epoch(), 0);
    }
}
