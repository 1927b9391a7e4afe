"""Ownership planning: what the agent adds, updates, takes over, restores and never touches."""

from node_agent.plan import Change, owned_while_writing, plan_target

NEW = {"username": "u", "password": "new"}
OLD = {"username": "u", "password": "old"}
FOREIGN = {"username": "someone", "password": "else"}


def test_absent_key_is_added_and_owned_with_no_previous_value() -> None:
    plan = plan_target(current={}, desired={"r": NEW}, owned={})
    assert plan.updates == {"r": NEW}
    assert plan.owned_after == {"r": None}
    assert plan.changes == (Change("r", "add"),)


def test_file_already_matching_needs_no_update() -> None:
    plan = plan_target(current={"r": NEW}, desired={"r": NEW}, owned={"r": None})
    assert plan.in_sync
    assert plan.owned_after == {"r": None}


def test_owned_key_with_a_new_password_is_updated() -> None:
    plan = plan_target(current={"r": OLD}, desired={"r": NEW}, owned={"r": None})
    assert plan.updates == {"r": NEW}
    assert plan.changes == (Change("r", "update"),)


def test_foreign_entry_for_a_managed_registry_is_taken_over_and_remembered() -> None:
    plan = plan_target(current={"r": FOREIGN}, desired={"r": NEW}, owned={})
    assert plan.updates == {"r": NEW}
    assert plan.owned_after == {"r": FOREIGN}
    assert plan.changes == (Change("r", "take over"),)


def test_registry_leaving_the_secret_gets_its_previous_value_back() -> None:
    plan = plan_target(current={"r": NEW}, desired={}, owned={"r": FOREIGN})
    assert plan.updates == {"r": FOREIGN}
    assert plan.owned_after == {}
    assert plan.changes == (Change("r", "restore"),)


def test_registry_the_agent_added_is_removed_when_it_leaves() -> None:
    plan = plan_target(current={"r": NEW}, desired={}, owned={"r": None})
    assert plan.updates == {"r": None}
    assert plan.changes == (Change("r", "remove"),)


def test_drifted_owned_entry_is_repaired() -> None:
    plan = plan_target(
        current={"r": {"username": "tampered"}}, desired={"r": NEW}, owned={"r": None}
    )
    assert plan.updates == {"r": NEW}


def test_deleted_owned_entry_is_written_again() -> None:
    plan = plan_target(current={}, desired={"r": NEW}, owned={"r": None})
    assert plan.updates == {"r": NEW}
    assert plan.owned_after == {"r": None}  # the remembered previous value is kept, not re-read


def test_entries_never_owned_are_never_touched() -> None:
    plan = plan_target(current={"other": FOREIGN, "r": NEW}, desired={"r": NEW}, owned={"r": None})
    assert "other" not in plan.updates
    assert "other" not in plan.owned_after


def test_ownership_persisted_before_a_write_covers_both_sides() -> None:
    assert owned_while_writing({"gone": FOREIGN}, {"new": None}) == {"gone": FOREIGN, "new": None}
