//! The tree of nodes: names, ownership, visibility and attributes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use crate::{Caller, Errno, FileKind, FileOps, NodeId, Owner};

pub(crate) enum NodeKind {
    Dir(BTreeMap<Box<str>, NodeId>),
    File(Arc<dyn FileOps>, FileKind),
}

impl NodeKind {
    pub fn dir() -> Self {
        NodeKind::Dir(BTreeMap::new())
    }
}

pub(crate) struct Node {
    parent: NodeId,
    name: Box<str>,
    owner: Owner,
    created: SystemTime,
    kind: NodeKind,
}

impl Node {
    /// A private node exists only for its owner and root.
    fn visible(&self, caller: &Caller) -> bool {
        !self.owner.private || caller.is_root() || caller.uid == self.owner.uid
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Dir,
    File,
}

/// A node's attributes, as `stat` shows them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attr {
    pub ino: NodeId,
    pub kind: EntryKind,
    pub uid: u32,
    pub gid: u32,
    pub perm: u16,
    pub created: SystemTime,
}

/// One entry of a directory listing.
pub(crate) type DirEntry = (NodeId, EntryKind, Box<str>);

/// What [`Tree::detach`] took out.
pub(crate) struct Detached {
    pub parent: NodeId,
    pub name: Box<str>,
    /// The file nodes that went away.
    pub files: Vec<NodeId>,
}

pub(crate) struct Tree {
    nodes: HashMap<NodeId, Node>,
    next_ino: u64,
}

impl Tree {
    pub fn new(root: Owner) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            NodeId::ROOT,
            Node {
                parent: NodeId::ROOT,
                name: "".into(),
                owner: root,
                created: SystemTime::now(),
                kind: NodeKind::dir(),
            },
        );
        Tree { nodes, next_ino: 2 }
    }

    pub fn add(
        &mut self,
        parent: NodeId,
        name: &str,
        owner: Owner,
        kind: NodeKind,
    ) -> Result<NodeId, Errno> {
        let id = NodeId(self.next_ino);
        match self.nodes.get_mut(&parent).map(|n| &mut n.kind) {
            Some(NodeKind::Dir(children)) => {
                if children.contains_key(name) {
                    return Err(Errno::EEXIST);
                }
                children.insert(name.into(), id);
            }
            Some(NodeKind::File(..)) => return Err(Errno::ENOTDIR),
            None => return Err(Errno::ENOENT),
        }
        self.next_ino += 1;
        self.nodes.insert(
            id,
            Node {
                parent,
                name: name.into(),
                owner,
                created: SystemTime::now(),
                kind,
            },
        );
        Ok(id)
    }

    /// Unlinks `node` and drops its subtree. The root stays.
    pub fn detach(&mut self, node: NodeId) -> Option<Detached> {
        if node == NodeId::ROOT {
            return None;
        }
        let removed = self.nodes.remove(&node)?;
        if let Some(NodeKind::Dir(children)) =
            self.nodes.get_mut(&removed.parent).map(|n| &mut n.kind)
        {
            children.remove(&removed.name);
        }
        let mut files = Vec::new();
        let mut stack = vec![(node, removed.kind)];
        while let Some((id, kind)) = stack.pop() {
            match kind {
                NodeKind::Dir(children) => {
                    for child in children.values() {
                        if let Some(n) = self.nodes.remove(child) {
                            stack.push((*child, n.kind));
                        }
                    }
                }
                NodeKind::File(..) => files.push(id),
            }
        }
        Some(Detached {
            parent: removed.parent,
            name: removed.name,
            files,
        })
    }

    /// A child by name, whoever may see it.
    pub fn child(&self, parent: NodeId, name: &str) -> Option<NodeId> {
        match &self.nodes.get(&parent)?.kind {
            NodeKind::Dir(children) => children.get(name).copied(),
            NodeKind::File(..) => None,
        }
    }

    /// A child as `caller` finds it: a node it may not see does not exist.
    pub fn lookup(&self, caller: &Caller, parent: NodeId, name: &str) -> Result<Attr, Errno> {
        let dir = self.nodes.get(&parent).ok_or(Errno::ENOENT)?;
        let NodeKind::Dir(children) = &dir.kind else {
            return Err(Errno::ENOTDIR);
        };
        let id = *children.get(name).ok_or(Errno::ENOENT)?;
        let node = self.nodes.get(&id).ok_or(Errno::ENOENT)?;
        if !node.visible(caller) {
            return Err(Errno::ENOENT);
        }
        Ok(Self::attr_of(id, node))
    }

    pub fn attr(&self, id: NodeId) -> Result<Attr, Errno> {
        self.nodes
            .get(&id)
            .map(|node| Self::attr_of(id, node))
            .ok_or(Errno::ENOENT)
    }

    fn attr_of(id: NodeId, node: &Node) -> Attr {
        Attr {
            ino: id,
            kind: match node.kind {
                NodeKind::Dir(_) => EntryKind::Dir,
                NodeKind::File(..) => EntryKind::File,
            },
            uid: node.owner.uid,
            gid: node.owner.gid,
            perm: node.owner.perm,
            created: node.created,
        }
    }

    /// The handler of a file `caller` opens. Its cached entry may outlive
    /// its visibility (see [`Owner::private`]): refused with EACCES then.
    pub fn open_file(
        &self,
        caller: &Caller,
        id: NodeId,
    ) -> Result<(Arc<dyn FileOps>, FileKind), Errno> {
        let node = self.nodes.get(&id).ok_or(Errno::ENOENT)?;
        if !node.visible(caller) {
            return Err(Errno::EACCES);
        }
        match &node.kind {
            NodeKind::File(ops, kind) => Ok((ops.clone(), *kind)),
            NodeKind::Dir(_) => Err(Errno::EISDIR),
        }
    }

    pub fn is_command(&self, id: NodeId) -> Result<bool, Errno> {
        match &self.nodes.get(&id).ok_or(Errno::ENOENT)?.kind {
            NodeKind::File(_, kind) => Ok(*kind == FileKind::Command),
            NodeKind::Dir(_) => Ok(false),
        }
    }

    /// The listing of directory `id` as `caller` sees it, with `.` and `..`.
    pub fn listing(&self, caller: &Caller, id: NodeId) -> Result<Vec<DirEntry>, Errno> {
        let node = self.nodes.get(&id).ok_or(Errno::ENOENT)?;
        if !node.visible(caller) {
            return Err(Errno::EACCES);
        }
        let NodeKind::Dir(children) = &node.kind else {
            return Err(Errno::ENOTDIR);
        };
        let mut listing = vec![
            (id, EntryKind::Dir, ".".into()),
            (node.parent, EntryKind::Dir, "..".into()),
        ];
        for (name, child_id) in children {
            if let Some(child) = self.nodes.get(child_id) {
                if child.visible(caller) {
                    let kind = Self::attr_of(*child_id, child).kind;
                    listing.push((*child_id, kind, name.clone()));
                }
            }
        }
        Ok(listing)
    }

    /// The nodes a change notice for `node` concerns: the node itself, or
    /// every child of a directory. A removed node still concerns itself, so
    /// its blocked readers and pollers are re-evaluated.
    pub fn files_of(&self, node: NodeId) -> Vec<NodeId> {
        match self.nodes.get(&node).map(|n| &n.kind) {
            Some(NodeKind::Dir(children)) => children.values().copied().collect(),
            _ => vec![node],
        }
    }
}
