package org.cdrsync.fhir;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.api.model.HistoryCountModeEnum;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.interceptor.UserRequestRetryVersionConflictsInterceptor;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.narrative2.NullNarrativeGenerator;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.HardcodedServerAddressStrategy;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.LoggingInterceptor;
import ca.uhn.fhir.rest.server.interceptor.ResponseHighlighterInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.core.env.Environment;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

import java.nio.file.Path;
import java.time.Duration;
import java.util.Properties;
import javax.sql.DataSource;

/**
 * Spring configuration of the HAPI FHIR JPA server, R4 only: HAPI's own JPA/R4/batch configurations plus the
 * beans an application must supply (data source, entity manager factory, transaction manager, storage
 * settings) and the RESTful server. Nothing here downloads packages or implementation guides, and full-text
 * (Lucene/Elasticsearch) indexing is off.
 */
@Configuration
@EnableTransactionManagement
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionChannelConfig.class, // in-memory message channels that HAPI's batch jobs run on
	ThreadPoolFactoryConfig.class
})
public class FhirServerConfig {

	private final Environment env;

	public FhirServerConfig(Environment env) {
		this.env = env;
	}

	private boolean flag(String key, boolean dflt) {
		return env.getProperty(key, Boolean.class, dflt);
	}

	@Bean(destroyMethod = "close")
	public DataSource dataSource() {
		Path dir = Path.of(env.getProperty("fhir.data-dir", ".stack/data/fhir")).toAbsolutePath().resolve("h2");
		BasicDataSource ds = new BasicDataSource();
		ds.setDriver(new org.h2.Driver());
		ds.setUrl(env.getProperty("fhir.db.url", "jdbc:h2:file:" + dir.resolve("hapi") + ";DB_CLOSE_ON_EXIT=FALSE"));
		ds.setUsername("sa");
		ds.setPassword("");
		ds.setMaxTotal(env.getProperty("fhir.db.max-connections", Integer.class, 10));
		ds.setMaxWait(Duration.ofSeconds(30));
		return ds;
	}

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		emf.setPersistenceUnitName("HAPI_PU");
		emf.setDataSource(dataSource);
		Properties jpa = new Properties();
		jpa.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		jpa.put("hibernate.hbm2ddl.auto", "update");
		jpa.put("hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		jpa.put("hibernate.physical_naming_strategy",
				"org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy");
		jpa.put("hibernate.format_sql", "false");
		jpa.put("hibernate.show_sql", "false");
		jpa.put("hibernate.jdbc.batch_size", "20");
		jpa.put("hibernate.cache.use_query_cache", "false");
		jpa.put("hibernate.cache.use_second_level_cache", "false");
		jpa.put("hibernate.cache.use_structured_entries", "false");
		jpa.put("hibernate.cache.use_minimal_puts", "false");
		jpa.put("hibernate.search.enabled", "false");
		emf.setJpaProperties(jpa);
		return emf;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	@Bean
	public JpaStorageSettings jpaStorageSettings() {
		JpaStorageSettings s = new JpaStorageSettings();
		s.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.valueOf(
				env.getProperty("fhir.client-id-strategy", "ANY")));
		s.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.valueOf(
				env.getProperty("fhir.server-id-strategy", "UUID")));
		s.setEnforceReferentialIntegrityOnWrite(flag("fhir.enforce-referential-integrity-on-write", true));
		s.setEnforceReferentialIntegrityOnDelete(flag("fhir.enforce-referential-integrity-on-delete", true));
		s.setAllowExternalReferences(flag("fhir.allow-external-references", false));
		s.setAutoCreatePlaceholderReferenceTargets(flag("fhir.auto-create-placeholder-reference-targets", false));
		s.setDeleteEnabled(flag("fhir.delete-enabled", true));
		s.setAllowMultipleDelete(flag("fhir.allow-multiple-delete", true));
		s.setExpungeEnabled(flag("fhir.expunge-enabled", true));
		s.setDeleteExpungeEnabled(flag("fhir.delete-expunge-enabled", true));
		long reuse = env.getProperty("fhir.reuse-cached-search-results-millis", Long.class, 0L);
		s.setReuseCachedSearchResultsForMillis(reuse > 0 ? reuse : null);
		s.setFetchSizeDefaultMaximum(env.getProperty("fhir.max-page-size", Integer.class, 500));
		// HAPI's default caches a history's count for a minute and pages by it: a _history read right after
		// another one showed only as many versions as the first saw (cdrsync reads histories to decide).
		s.setHistoryCountMode(HistoryCountModeEnum.valueOf(env.getProperty("fhir.history-count-mode", "COUNT_ACCURATE")));
		s.setHibernateSearchIndexFullText(false);
		s.setHibernateSearchIndexSearchParams(false);
		return s;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings();
	}

	@Bean
	public RestfulServer restfulServer(
			FhirContext fhirContext,
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			JpaSystemProvider<?, ?> systemProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider) {
		fhirContext.setNarrativeGenerator(new NullNarrativeGenerator());

		RestfulServer server = new RestfulServer(fhirContext);
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilities.setImplementationDescription("cdrsync local HAPI FHIR R4 server");
		server.setServerConformanceProvider(capabilities);

		pagingProvider.setDefaultPageSize(env.getProperty("fhir.default-page-size", Integer.class, 20));
		pagingProvider.setMaximumPageSize(env.getProperty("fhir.max-page-size", Integer.class, 500));
		server.setPagingProvider(pagingProvider);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.registerInterceptor(new ResponseHighlighterInterceptor());
		// Opt-in per request: a client sending "X-Retry-On-Version-Conflict: retry; max-retries=N" has a
		// concurrent-update version conflict (409, HAPI-0550) retried by the server instead of returned.
		server.registerInterceptor(new UserRequestRetryVersionConflictsInterceptor());
		if (flag("fhir.access-log", true)) {
			// One line per successful request (logger fhir.access); failures are already logged, one line
			// each, by HAPI's ExceptionHandlingInterceptor.
			LoggingInterceptor access = new LoggingInterceptor();
			access.setLoggerName("fhir.access");
			access.setMessageFormat(
					"${requestVerb} ${operationType} ${idOrResourceName} ${requestParameters} ${processingTimeMillis}ms");
			access.setLogExceptions(false);
			server.registerInterceptor(access);
		}

		String address = env.getProperty("fhir.server-address", "");
		server.setServerAddressStrategy(
				address.isBlank()
						? new IncomingRequestAddressStrategy()
						: new HardcodedServerAddressStrategy(address));
		return server;
	}
}
