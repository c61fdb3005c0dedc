//! Push rules: each user's ruleset, kept as the `m.push_rules` account data and
//! starting from the spec's server-default rules.

use ruma::{
    UserId,
    push::{Action, AnyPushRule, NewPushRule, RuleKind, Ruleset},
};
use serde_json::json;

use super::Services;
use crate::error::{Error, Result};

impl Services {
    /// The user's ruleset (the server defaults until they change something).
    pub async fn push_rules(&self, user: &UserId) -> Result<Ruleset> {
        match self.store.get_account_data(user.as_str(), "", "m.push_rules").await? {
            Some(content) => {
                let value: serde_json::Value = serde_json::from_str(&content).map_err(Error::internal)?;
                serde_json::from_value(value["global"].clone()).map_err(Error::internal)
            }
            None => Ok(Ruleset::server_default(user)),
        }
    }

    async fn save_push_rules(&self, user: &UserId, rules: &Ruleset) -> Result<()> {
        let content = json!({"global": rules}).to_string();
        self.store.set_account_data(user.as_str(), "", "m.push_rules", &content).await?;
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
        let mut rules = self.push_rules(user).await?;
        rules.insert(rule, after, before).map_err(|e| Error::bad_json(format!("Cannot add the rule: {e}")))?;
        self.save_push_rules(user, &rules).await
    }

    pub async fn delete_push_rule(&self, user: &UserId, kind: RuleKind, rule_id: &str) -> Result<()> {
        let mut rules = self.push_rules(user).await?;
        rules.remove(kind, rule_id).map_err(|e| match e {
            ruma::push::RemovePushRuleError::NotFound => Error::not_found("No such push rule"),
            other => Error::bad_json(other.to_string()),
        })?;
        self.save_push_rules(user, &rules).await
    }

    pub async fn set_push_rule_enabled(
        &self,
        user: &UserId,
        kind: RuleKind,
        rule_id: &str,
        enabled: bool,
    ) -> Result<()> {
        let mut rules = self.push_rules(user).await?;
        rules.set_enabled(kind, rule_id, enabled).map_err(|_| Error::not_found("No such push rule"))?;
        self.save_push_rules(user, &rules).await
    }

    pub async fn set_push_rule_actions(
        &self,
        user: &UserId,
        kind: RuleKind,
        rule_id: &str,
        actions: Vec<Action>,
    ) -> Result<()> {
        let mut rules = self.push_rules(user).await?;
        rules.set_actions(kind, rule_id, actions).map_err(|_| Error::not_found("No such push rule"))?;
        self.save_push_rules(user, &rules).await
    }
}
