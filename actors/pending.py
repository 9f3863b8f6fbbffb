"""The pending queue: activations waiting for a worker, in claim order.

Workers claim with no filter, with an application, with an application and a namespace,
or (rarely) with a namespace alone. Each of those must find the oldest matching entry in
O(log n), so entries live in one heap per (application, namespace) group, and every wider
scope keeps a small heap of its groups' heads: a k-way merge whose size follows the number
of groups, not of records.

Entries are never removed from the middle of a heap. An entry holds its record object, and
a record is pending under at most one entry at a time (it leaves pending either by being
popped or for good), so an entry whose record is no longer PENDING is dead and is skipped
when it reaches the top. A re-ingested id is a new record object: old entries stay dead.

A held group (a paused namespace or application) keeps its heap but leaves every scope's
head heap: a claim never sees it, so holding any number of groups costs a claim nothing.
Its head goes back into the scopes when it is released.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import TypeAlias

from actors.records import Record, Status

Entry: TypeAlias = tuple[int, Record]
"""(claim order, record). The order is added_at in microseconds, then a push sequence that
keeps ingest order among records added in the same microsecond; it is unique, so records
are never compared, and one int compares faster than a tuple of two."""

_SEQUENCE_BITS = 64  # 2**64 pushes: centuries at any rate this broker reaches

Group: TypeAlias = tuple[str, str]
"""(application, namespace)."""

Scope: TypeAlias = tuple[str | None, str | None]
"""A claim filter wider than one group: (None, None), (application, None), (None, namespace)."""

_HeadEntry: TypeAlias = tuple[Entry, Group]

# A scope's head heap collects a duplicate each time one of its groups gets an older head;
# past this slack over the number of groups it is rebuilt, an O(groups) step that is rare.
_HEAD_HEAP_SLACK = 16


def _scopes_of(group: Group) -> tuple[Scope, Scope, Scope]:
    application, namespace = group
    return (None, None), (application, None), (None, namespace)


class PendingQueue:
    """Pending activations by group, poppable oldest-first within any filter."""

    def __init__(self) -> None:
        self._sequence = itertools.count()
        self._groups: dict[Group, list[Entry]] = {}
        self._heads: dict[Scope, list[_HeadEntry]] = {}
        self._scope_groups: dict[Scope, set[Group]] = {}
        self._held: set[Group] = set()
        self._is_held: Callable[[Group], bool] | None = None

    def __repr__(self) -> str:
        entries = sum(len(heap) for heap in self._groups.values())
        return (
            f"PendingQueue(groups={len(self._groups)}, held={len(self._held)}, entries={entries})"
        )

    def hold(self, is_held: Callable[[Group], bool] | None) -> None:
        """Hold every group, present or future, for which `is_held` is true, and release
        the others; None releases every group. O(groups): rules change rarely."""
        self._is_held = is_held
        held = set() if is_held is None else {g for g in self._groups if is_held(g)}
        released, self._held = self._held - held, held
        for group in released:
            top = self._live_top(group)
            if top is not None:
                for scope in _scopes_of(group):
                    self._push_head(scope, top, group)

    def is_held(self, group: Group) -> bool:
        return group in self._held

    def push(self, record: Record) -> None:
        order = (int(record.added_at * 1_000_000) << _SEQUENCE_BITS) | next(self._sequence)
        self.push_back((order, record))

    def push_back(self, entry: Entry) -> None:
        """Queue an entry that `pop` returned, in the place it had (a push that failed)."""
        record = entry[1]
        group = (record.application, record.namespace)
        heap = self._groups.get(group)
        if heap is None:
            heap = self._groups[group] = []
            for scope in _scopes_of(group):
                self._scope_groups.setdefault(scope, set()).add(group)
            if self._is_held is not None and self._is_held(group):
                self._held.add(group)
        is_new_head = not heap or entry < heap[0]
        heapq.heappush(heap, entry)
        if is_new_head and group not in self._held:
            for scope in _scopes_of(group):
                self._push_head(scope, entry, group)

    def pop(self, application: str | None, namespace: str | None) -> Entry | None:
        """Remove and return the oldest live entry within the filter, or None."""
        if application is not None and namespace is not None:
            group = (application, namespace)
            if group in self._held:
                return None
            top = self._live_top(group)
            if top is None:
                return None
            heapq.heappop(self._groups[group])
            return top
        found = self._find_in_scope((application, namespace))
        if found is None:
            return None
        scope_heads = self._heads[(application, namespace)]
        entry, group = found
        group_heap = self._groups[group]
        heapq.heappop(group_heap)
        if group_heap:
            heapq.heapreplace(scope_heads, (group_heap[0], group))
        else:
            heapq.heappop(scope_heads)
        return entry

    def peek_oldest(self) -> Entry | None:
        """The oldest live entry of all, without removing it."""
        found = self._find_in_scope((None, None))
        return None if found is None else found[0]

    def prune(self, group: Group) -> None:
        """Drop dead entries at the top of a group, e.g. after expiry removed its oldest."""
        self._live_top(group)

    def _live_top(self, group: Group) -> Entry | None:
        heap = self._groups.get(group)
        if not heap:
            return None
        while heap and heap[0][1].status is not Status.PENDING:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _find_in_scope(self, scope: Scope) -> _HeadEntry | None:
        """The scope's oldest live entry, with the head heap's top left pointing at it.

        Each head entry is at most as old as its group's real head, so the first head entry
        that still equals its group's live top is the oldest in the scope. A held group's
        head entries are dropped as they surface, each once: its heap is never looked at.
        """
        scope_heads = self._heads.get(scope)
        held = self._held
        while scope_heads:
            head, group = scope_heads[0]
            if group in held:
                heapq.heappop(scope_heads)
                continue
            top = self._live_top(group)
            if top is None:
                heapq.heappop(scope_heads)
            elif top is not head:
                heapq.heapreplace(scope_heads, (top, group))
            else:
                return head, group
        return None

    def _push_head(self, scope: Scope, entry: Entry, group: Group) -> None:
        scope_heads = self._heads.setdefault(scope, [])
        heapq.heappush(scope_heads, (entry, group))
        groups = self._scope_groups[scope]
        if len(scope_heads) > 2 * len(groups) + _HEAD_HEAP_SLACK:
            held = self._held
            scope_heads[:] = [
                (self._groups[g][0], g) for g in groups if self._groups[g] and g not in held
            ]
            heapq.heapify(scope_heads)
