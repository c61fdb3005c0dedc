//! Push rules: each user's ruleset, kept as the `m.push_rules` account data and
//! starting from the spec's server-default rules.

use ruma::{
    UserId,
    push::{Action, AnyPushRule, NewPushRule, RuleKind, Ruleset},
};
use serde_json::json;

use super::Services;
use crate::error::{Error, Result};

/// A stored `m.push_rules` content's ruleset.
fn parse_ruleset(content: &str) -> Result<Ruleset> {
    let value: serde_json::Value = serde_json::from_str(content).map_err(Error::internal)?;
    serde_json::from_value(value["global"].clone()).map_err(Error::internal)
}

impl Services {
    /// The user's ruleset (the server defaults until they change something).
    pub async fn push_rules(&self, user: &UserId) -> Result<Ruleset> {
        match self.store.get_account_data(user.as_str(), "", "m.push_rules").await? {
            Some(content) => parse_ruleset(&content),
            None => Ok(Ruleset::server_default(user)),
        }
    }

    /// Reads, changes and writes the user's ruleset in one transaction, so that
    /// concurrent changes do not undo each other.
    async fn update_push_rules(&self, user: &UserId, change: impl FnOnce(&mut Ruleset) -> Result<()>) -> Result<()> {
        self.store
            .update_account_data(user.as_str(), "", "m.push_rules", |current| {
                let mut rules = match current {
                    Some(content) => parse_ruleset(content)?,
                    None => Ruleset::server_default(user),
                };
                change(&mut rules)?;
                Ok(Some(json!({"global": rules}).to_string()))
            })
            .await?;
        self.ruleset_cache.forget(user);
        self.notifier.notify_users(&[user.to_owned()]);
        Ok(())
    }

    pub async fn push_rule(&self, user: &UserId, kind: RuleKind, rule_id: &str) -> Result<AnyPushRule> {
        let rules = self.push_rules(user).await?;
        rules.get(kind, rule_id).map(|r| r.to_owned()).ok_or_else(|| Error::not_found("No such push rule"))
    }

    pub async fn set_push_rule(
        &self,
        user: &UserId,
        rule: NewPushRule,
        after: Option<&str>,
        before: Option<&str>,
    ) -> Result<()> {
        self.update_push_rules(user, |rules| {
            rules.insert(rule, after, before).map_err(|e| Error::bad_json(format!("Cannot add the rule: {e}")))
        })
        .await
    }

    pub async fn delete_push_rule(&self, user: &UserId, kind: RuleKind, rule_id: &str) -> Result<()> {
        self.update_push_rules(user, |rules| {
            rules.remove(kind, rule_id).map_err(|e| match e {
                ruma::push::RemovePushRuleError::NotFound => Error::not_found("No such push rule"),
                other => Error::bad_json(other.to_string()),
            })
        })
        .await
    }

    pub async fn set_push_rule_enabled(
        &self,
        user: &UserId,
        kind: RuleKind,
        rule_id: &str,
        enabled: bool,
    ) -> Result<()> {
        self.update_push_rules(user, |rules| {
            rules.set_enabled(kind, rule_id, enabled).map_err(|_| Error::not_found("No such push rule"))
        })
        .await
    }

    pub async fn set_push_rule_actions(
        &self,
        user: &UserId,
        kind: RuleKind,
        rule_id: &str,
        actions: Vec<Action>,
    ) -> Result<()> {
        self.update_push_rules(user, |rules| {
            rules.set_actions(kind, rule_id, actions).map_err(|_| Error::not_found("No such push rule"))
        })
        .await
    }
}
