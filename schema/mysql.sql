CREATE TABLE `EVENT_OUTBOX` (
	`ID` BIGINT NOT NULL AUTO_INCREMENT, 
	`EventID` VARCHAR(36) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`Topic` VARCHAR(249) NOT NULL, 
	`MessageKey` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`Payload` LONGTEXT NOT NULL, 
	`CreatedTimestamp` DATETIME(6) NOT NULL, 
	`PublishedTimestamp` DATETIME(6), 
	PRIMARY KEY (`ID`), 
	UNIQUE (`EventID`)
);

CREATE INDEX ix_outbox_unpublished ON `EVENT_OUTBOX` (`PublishedTimestamp`, `ID`);

CREATE TABLE `EVENT_OUTBOX_RELAY` (
	`Name` VARCHAR(32) NOT NULL, 
	PRIMARY KEY (`Name`)
);

CREATE TABLE `GLOBAL_LOCK` (
	`ID` BIGINT NOT NULL AUTO_INCREMENT, 
	`StateMachineType` VARCHAR(48) NOT NULL, 
	`StateMachineID` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`LookupKey` VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`LockTimestamp` DATETIME(6) NOT NULL, 
	`UnlockTimestamp` DATETIME(6), 
	PRIMARY KEY (`ID`)
);

CREATE INDEX ix_global_lock_key ON `GLOBAL_LOCK` (`LookupKey`, `UnlockTimestamp`);

CREATE INDEX ix_global_lock_machine ON `GLOBAL_LOCK` (`StateMachineType`, `StateMachineID`);

CREATE TABLE `LOOKUP_KEY_MUTEX` (
	`LookupKey` VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	PRIMARY KEY (`LookupKey`)
);

CREATE TABLE `OPERATOR_AUDIT` (
	`ID` BIGINT NOT NULL AUTO_INCREMENT, 
	`Action` VARCHAR(32) NOT NULL, 
	`Target` VARCHAR(400) NOT NULL, 
	`Actor` VARCHAR(256) NOT NULL, 
	`Reason` TEXT NOT NULL, 
	`OccurredTimestamp` DATETIME(6) NOT NULL, 
	PRIMARY KEY (`ID`)
);

CREATE TABLE `PROCESSED_COMMAND` (
	`CommandID` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`Command` VARCHAR(16) NOT NULL, 
	`StateMachineType` VARCHAR(48) NOT NULL, 
	`StateMachineID` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, 
	`Outcome` VARCHAR(32) NOT NULL, 
	`KafkaTopic` VARCHAR(249), 
	`KafkaPartition` INTEGER, 
	`KafkaOffset` BIGINT, 
	`ReceivedTimestamp` DATETIME(6) NOT NULL, 
	PRIMARY KEY (`CommandID`)
);

CREATE INDEX ix_processed_command_received ON `PROCESSED_COMMAND` (`ReceivedTimestamp`);

CREATE TABLE `STATE_MACHINE_ACCOUNT_ONBOARDING` (
	`ID` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`Name` VARCHAR(48) NOT NULL, 
	`LookupKey` VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`CurrentState` VARCHAR(32) NOT NULL, 
	`ResumeFromStep` INTEGER NOT NULL, 
	`SaveAfterStep` BOOL NOT NULL, 
	`KafkaEventTopic` VARCHAR(249), 
	`SerializedState` LONGTEXT NOT NULL, 
	`CreatedTimestamp` DATETIME(6) NOT NULL, 
	`UpdatedTimestamp` DATETIME(6) NOT NULL, 
	`UsesGlobalLock` BOOL NOT NULL, 
	`UsesLocalLock` BOOL NOT NULL, 
	`UnlockedTimestamp` DATETIME(6), 
	`LastRetryTimestamp` DATETIME(6), 
	`Version` BIGINT NOT NULL, 
	`RetryCount` INTEGER NOT NULL, 
	`NextRunTimestamp` DATETIME(6), 
	`LeaseOwner` VARCHAR(128), 
	`LeaseExpiresTimestamp` DATETIME(6), 
	`DefinitionFingerprint` TEXT NOT NULL, 
	`PendingRequest` TEXT, 
	PRIMARY KEY (`ID`)
);

CREATE INDEX ix_account_onboarding_lookup ON `STATE_MACHINE_ACCOUNT_ONBOARDING` (`LookupKey`, `CurrentState`);

CREATE INDEX ix_account_onboarding_runnable ON `STATE_MACHINE_ACCOUNT_ONBOARDING` (`NextRunTimestamp`);

CREATE INDEX ix_account_onboarding_state ON `STATE_MACHINE_ACCOUNT_ONBOARDING` (`CurrentState`, `UpdatedTimestamp`);

CREATE TABLE `STATE_MACHINE_HISTORY` (
	`ID` BIGINT NOT NULL AUTO_INCREMENT, 
	`StateMachineType` VARCHAR(48) NOT NULL, 
	`StateMachineID` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`Sequence` INTEGER NOT NULL, 
	`EventID` VARCHAR(36) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`Event` VARCHAR(32) NOT NULL, 
	`FromState` VARCHAR(32) NOT NULL, 
	`ToState` VARCHAR(32) NOT NULL, 
	`FromStep` INTEGER, 
	`ToStep` INTEGER, 
	`Handler` VARCHAR(100), 
	`InputData` LONGTEXT, 
	`OutputData` LONGTEXT, 
	`Error` TEXT, 
	`Attempt` INTEGER NOT NULL, 
	`DurationMs` FLOAT, 
	`WorkerID` VARCHAR(128), 
	`CommandID` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, 
	`Actor` VARCHAR(256), 
	`Reason` TEXT, 
	`OccurredTimestamp` DATETIME(6) NOT NULL, 
	PRIMARY KEY (`ID`), 
	CONSTRAINT uq_history_seq UNIQUE (`StateMachineType`, `StateMachineID`, `Sequence`), 
	UNIQUE (`EventID`)
);

CREATE TABLE `STATE_MACHINE_ORDER_SAGA` (
	`ID` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`Name` VARCHAR(48) NOT NULL, 
	`LookupKey` VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, 
	`CurrentState` VARCHAR(32) NOT NULL, 
	`ResumeFromStep` INTEGER NOT NULL, 
	`SaveAfterStep` BOOL NOT NULL, 
	`KafkaEventTopic` VARCHAR(249), 
	`SerializedState` LONGTEXT NOT NULL, 
	`CreatedTimestamp` DATETIME(6) NOT NULL, 
	`UpdatedTimestamp` DATETIME(6) NOT NULL, 
	`UsesGlobalLock` BOOL NOT NULL, 
	`UsesLocalLock` BOOL NOT NULL, 
	`UnlockedTimestamp` DATETIME(6), 
	`LastRetryTimestamp` DATETIME(6), 
	`Version` BIGINT NOT NULL, 
	`RetryCount` INTEGER NOT NULL, 
	`NextRunTimestamp` DATETIME(6), 
	`LeaseOwner` VARCHAR(128), 
	`LeaseExpiresTimestamp` DATETIME(6), 
	`DefinitionFingerprint` TEXT NOT NULL, 
	`PendingRequest` TEXT, 
	PRIMARY KEY (`ID`)
);

CREATE INDEX ix_order_saga_lookup ON `STATE_MACHINE_ORDER_SAGA` (`LookupKey`, `CurrentState`);

CREATE INDEX ix_order_saga_runnable ON `STATE_MACHINE_ORDER_SAGA` (`NextRunTimestamp`);

CREATE INDEX ix_order_saga_state ON `STATE_MACHINE_ORDER_SAGA` (`CurrentState`, `UpdatedTimestamp`);

CREATE TABLE `STATE_MACHINE_TYPE_LOCK` (
	`StateMachineType` VARCHAR(48) NOT NULL, 
	`LockKind` VARCHAR(16) NOT NULL, 
	`LockTimestamp` DATETIME(6) NOT NULL, 
	`UnlockTimestamp` DATETIME(6), 
	`Actor` VARCHAR(256), 
	`Reason` TEXT, 
	PRIMARY KEY (`StateMachineType`)
);
